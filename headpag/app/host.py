"""
The model the web UI serves: loaded once, swapped at runtime, and shared by generation and search through one lock
(they never install processors at the same time); jobs that wait for the other say so.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from diffusers.utils import logging

from ..models.catalog import DEFAULT_MODEL, offline_models
from ..runtime import TransformerLayout, describe_transformer


logger = logging.get_logger(__name__)


def _shown(model: str) -> str:
    """A start-up model as clients see it: a local folder by its folder name, anything else as given."""
    return Path(model).name if os.path.isabs(model) or os.path.exists(model) else model


class ModelLock:
    r"""
    A lock that remembers which job holds it.

    `lock.held_by("search")` is a reusable context manager (HeadHunter takes one); `lock.hold("generate", on_wait)`
    calls `on_wait(holder)` once when it has to wait.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.holder: str | None = None

    def acquire(self, name: str, on_wait: Callable[[str], None] | None = None) -> None:
        if not self._lock.acquire(blocking=False):
            if on_wait is not None:
                on_wait(self.holder or "another job")
            self._lock.acquire()
        self.holder = name

    def release(self) -> None:
        self.holder = None
        self._lock.release()

    def held_by(self, name: str, on_wait: Callable[[str], None] | None = None) -> _Hold:
        return _Hold(self, name, on_wait)


class _Hold:
    def __init__(self, lock: ModelLock, name: str, on_wait: Callable[[str], None] | None):
        self.lock, self.name, self.on_wait = lock, name, on_wait

    def __enter__(self):
        self.lock.acquire(self.name, self.on_wait)
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


class ModelHost:
    r"""
    Holds the loaded pipeline of the UI.

    Args:
        model (`str`, *optional*): Loaded at start (the operator's choice: a hub id, a local folder or a tiny name);
            when that fails, the app still starts with `error` set (a message for clients, without server paths).
        device (`str`, *optional*), dtype (`str`, *optional*): As for `headpag generate`.
        output_dir (`str`, *optional*): Where generated PNGs are written (default: a fresh temporary folder).
        max_metric_models (`int`, defaults to 2): Metric models kept loaded (least recently used dropped first).
    """

    def __init__(
        self,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        output_dir: str | None = None,
        max_metric_models: int = 2,
    ):
        from ..options import resolve_device_dtype

        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.lock = ModelLock()
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="headpag-ui-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model_name: str | None = None
        self.pipe = None
        self._img2img = None
        self.layout: TransformerLayout | None = None
        self.error: str | None = None
        self._cancelled: set[str] = set()
        self._metrics: OrderedDict[tuple, object] = OrderedDict()
        self._metrics_lock = threading.Lock()
        self.max_metric_models = max_metric_models
        if model:
            try:
                self.load(model, name=_shown(model))
            except Exception as e:  # noqa: BLE001 - the app must start and say why
                logger.warning("Could not load %r: %s", model, e)
                self.error = self.describe_load_error(model, e)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def describe_load_error(model: str, error: Exception) -> str:
        """What clients read when the start-up model failed (no server path, no file content; the log has both)."""
        return (
            f"Could not load the start-up model {_shown(model)!r} ({type(error).__name__}; the server log has the "
            "details). Fix: log in with `hf auth login` (gated models) or give the server a local diffusers "
            f"folder; or load an offline model ({', '.join(offline_models())}) to try the interface."
        )

    def load(self, model: str, name: str | None = None) -> None:
        r"""
        Load `model` in place of the current one, under the model lock.

        Args:
            model (`str`): What `load_pipeline` gets (hub id, local folder or tiny name).
            name (`str`, *optional*): The name clients see and PNGs record (default `model`).
        """
        from ..models import load_pipeline

        model = (model or "").strip()
        if not model:
            raise ValueError(f"Give a model: a hub id, a local diffusers folder, or {', '.join(offline_models())}.")
        with self.lock.held_by("load"):
            pipe = load_pipeline(model, torch_dtype=self.dtype, device=self.device)
            pipe.set_progress_bar_config(disable=True)  # the UI shows its own progress
            self.pipe, self._img2img = pipe, None
            self.model_name, self.layout, self.error = name or model, describe_transformer(pipe.transformer), None

    def require(self):
        """The loaded pipeline, or a `ValueError` that says how to load one."""
        if self.pipe is None:
            raise ValueError(
                (self.error + " ")
                if self.error
                else f"No model is loaded. Load one in the Model box (e.g. {DEFAULT_MODEL})."
            )
        return self.pipe

    def img2img(self):
        """The img2img variant of the loaded pipeline (same components, no second copy of the weights)."""
        from ..models import PIPELINES

        pipe = self.require()
        if self._img2img is None:
            self._img2img = PIPELINES[(self.layout.family, True)].from_pipe(pipe)
        return self._img2img

    @property
    def family(self) -> str | None:
        return self.layout.family if self.layout else None

    def status_markdown(self) -> str:
        if self.pipe is None:
            return f"**No model loaded.** {self.error or ''}"
        layout = self.layout
        kind = "SD3 / SD3.5" if layout.family == "sd3" else "FLUX.1"
        extra = (
            f" (layers 0-{layout.num_double_blocks - 1} double-stream, the rest single-stream)"
            if layout.family == "flux"
            else ""
        )
        return (
            f"**Loaded:** `{self.model_name}`: {kind}, {layout.num_layers} layers x {layout.num_heads} heads{extra}, "
            f"on {self.device} ({self.dtype})."
        )

    # ------------------------------------------------------------------ cancellation (per browser session)
    def cancel(self, session: str) -> None:
        self._cancelled.add(session)

    def take_cancel(self, session: str) -> bool:
        """Whether `session` asked to cancel (and clear the request)."""
        if session in self._cancelled:
            self._cancelled.discard(session)
            return True
        return False

    def clear_cancel(self, session: str) -> None:
        self._cancelled.discard(session)

    # ------------------------------------------------------------------ metric models (loaded once)
    def metric(self, key: tuple, factory: Callable[[], object]) -> object:
        """The metric model under `key`, built once; at most `max_metric_models` are kept (least recent dropped)."""
        with self._metrics_lock:
            if key in self._metrics:
                self._metrics.move_to_end(key)
                return self._metrics[key]
        model = factory()
        with self._metrics_lock:
            self._metrics[key] = model
            while len(self._metrics) > self.max_metric_models:
                self._metrics.popitem(last=False)
        return model
