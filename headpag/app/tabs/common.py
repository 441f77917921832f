"""What every tab shares: the app context (model, roots, limits, admission, the current search), error handling that
never shows a traceback, a server path or a file's content, and the head grid helpers."""

from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from diffusers.utils import logging
from PIL import Image

from ..._lock import FolderLocked
from ...models.catalog import model_defaults, offline_models
from ...models.tiny import TINY_MODELS
from ...options import Limits
from ...pipelines.model_config import BUILTIN_PAG_DEFAULTS, pag_defaults
from ..admission import Admission
from ..generate import Cancelled
from ..heads_grid import render_grid, selected_pairs
from ..host import ModelHost
from ..roots import Roots
from ..search import SearchCancelled, SearchJob
from ..security import client_id
from ..storage import OutputStore


logger = logging.get_logger(__name__)

KNOWN_MODELS = [
    "stabilityai/stable-diffusion-3-medium-diffusers",
    "stabilityai/stable-diffusion-3.5-medium",
    "stabilityai/stable-diffusion-3.5-large",
    "black-forest-labs/FLUX.1-dev",
    "black-forest-labs/FLUX.1-schnell",
    *offline_models(),
]
CSS = """
#head-grid img { image-rendering: pixelated; cursor: pointer; }
/* Small images (the 64 px testbed) fill their boxes, scaled without smoothing; the gallery shows whole images. */
#out-pag img, #out-nopag img {
  image-rendering: pixelated; width: 100% !important; height: 100% !important; min-height: 256px;
  object-fit: contain !important;
}
#gallery img { image-rendering: pixelated; object-fit: contain !important; }
.field-error { color: #b42318; font-size: 0.9em; }
.field-ok { color: #067647; font-size: 0.9em; }
"""
MAX_INPUT_IMAGE_FACTOR = 4  # an img2img input may be up to 4 x max_size on a side (the pipeline resizes it)


@dataclass
class AppContext:
    r"""
    Everything the tabs' handlers use.

    Args:
        host ([`ModelHost`]): The model (may hold a start-up error instead).
        roots ([`Roots`]): The folders the UI may read or write.
        limits ([`~headpag.options.Limits`]): What one request may cost.
        model_switch (`bool`): Whether clients may load another model.
        admins (`frozenset[str]`): Clients (`"user:NAME"`) who may list every job and cancel any search.
    """

    host: ModelHost
    roots: Roots
    limits: Limits
    model_switch: bool = True
    admins: frozenset[str] = frozenset()
    admission: Admission = None
    store: OutputStore = None
    jobs: dict[str, SearchJob] = field(default_factory=dict)
    search_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        if self.admission is None:
            self.admission = Admission(self.limits)
        if self.store is None:
            self.store = OutputStore(self.roots.output, self.limits)

    # ------------------------------------------------------------------ errors
    def message(self, error: BaseException) -> str:
        """What a client reads of an error: our messages with server paths replaced, other errors by type only."""
        if isinstance(error, gr.Error):
            return self.roots.redact(str(error.message))
        if isinstance(error, UnicodeError):  # its message quotes the bytes it could not decode
            return "A file could not be read as text (not UTF-8); nothing was done."
        if isinstance(error, FolderLocked):  # its message names the owner's pid and host: not for clients
            logger.warning(str(error))
            return "This search run is in use by another search; try again when that one has finished."
        if isinstance(error, (ValueError, Cancelled, SearchCancelled)):
            return self.roots.redact(str(error))
        return f"{type(error).__name__} (the server log has the details)."

    def readable(self, fn):
        """Turn exceptions into `gr.Error` messages (no stack trace, server path or file content); the app keeps
        serving."""

        def convert(e: Exception) -> gr.Error:
            if not isinstance(e, (gr.Error, ValueError, Cancelled, SearchCancelled)):
                logger.exception("request failed")
            return gr.Error(self.message(e), print_exception=False)

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen_wrapper(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001
                    raise convert(e) from None

            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise convert(e) from None

        return wrapper

    # ------------------------------------------------------------------ heads
    def family_defaults(self) -> dict:
        """Control defaults for the loaded model (its `headpag_config.json`: sampler advice and PAG defaults; tiny
        models: few steps, small images), within the limits."""
        host, limits = self.host, self.limits
        tiny = host.model_name in TINY_MODELS or host.pipe is None  # nothing loaded: the tiny models are offered
        flux = host.family == "flux"
        steps = (4 if flux else 8) if tiny else 28
        size = 64 if tiny else 1024
        guidance = 3.5 if flux else 7.0
        builtin = model_defaults(host.model_name)
        steps, size, guidance = (
            builtin.get("steps", steps),
            builtin.get("size", size),
            builtin.get("guidance", guidance),
        )
        pag = pag_defaults(host.pipe) if host.pipe is not None else dict(BUILTIN_PAG_DEFAULTS)
        return dict(
            pag_scale=min(pag["pag_scale"], limits.max_scale),
            pag_identity_weight=pag["pag_identity_weight"],
            pag_identity_scope=pag["pag_identity_scope"],
            pag_target=pag["pag_target"],
            pag_interval=tuple(pag["pag_interval"]),
            pag_reuse=min(pag["pag_reuse"], 8),
            prompt=builtin.get("prompt", ""),
            note=str(builtin.get("note", "")),
            steps=min(steps, limits.max_steps),
            size=max(16, min(size, limits.max_size // 16 * 16)),
            guidance=min(guidance, limits.max_scale),
            true_cfg=max(1.0, min(float(builtin.get("true_cfg", 1.0)), limits.max_scale)),
            guidance_label="Guidance embedding (FLUX)" if flux else "CFG scale (off at <= 1)",
            flux=flux,
        )

    def spec_check(self, spec: str) -> str:
        """A one-line verdict on a head spec, shown next to the field."""
        if self.host.layout is None:
            return ""
        if not isinstance(spec, str) or not spec.strip():
            return "<span class='field-ok'>Empty: the pipeline's default heads.</span>"
        try:
            pairs = selected_pairs(spec, self.host.layout.num_layers, self.host.layout.num_heads, self.limits)
        except ValueError as e:
            return f"<span class='field-error'>⚠ {_escape(str(e))}</span>"
        layers = sorted({l for l, _ in pairs})
        return f"<span class='field-ok'>✓ {len(pairs)} heads on layer(s) {', '.join(map(str, layers))}.</span>"

    def grid_image(self, spec: str, scores: dict | None = None):
        layout = self.host.layout
        if layout is None:
            return None
        try:
            chosen = selected_pairs(
                spec if isinstance(spec, str) else "", layout.num_layers, layout.num_heads, self.limits
            )
        except ValueError:
            chosen = set()
        return render_grid(layout.num_layers, layout.num_heads, chosen, scores, layout.num_double_blocks)


INJECTED = (gr.Request, gr.Progress, gr.SelectData)  # parameters Gradio fills itself


def by_name(handler, **components: gr.components.Component) -> list[gr.components.Component]:
    r"""
    A handler's input components in its parameter order, each given by the parameter's name: the one place an
    endpoint's inputs are declared (`width=s_width, height=s_height` cannot be swapped silently as in a list).

    Raises:
        `TypeError`: when a name is not a parameter of `handler`, or a parameter (other than the ones Gradio injects:
            request, progress, select data) has no component.
    """
    parameters = [
        p
        for p in inspect.signature(handler).parameters.values()
        if not (isinstance(p.default, INJECTED) or p.annotation in INJECTED or p.annotation in ("gr.Request",))
        and p.name not in ("request", "progress", "evt")
    ]
    names = [p.name for p in parameters]
    unknown, missing = sorted(set(components) - set(names)), [n for n in names if n not in components]
    if unknown or missing:
        raise TypeError(f"{handler.__name__}: components for unknown parameters {unknown}, none for {missing}.")
    return [components[name] for name in names]


def scores_from_state(state) -> dict | None:
    return None if not state else {tuple(map(int, k.split("."))): v for k, v in state.items()}


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def client(request: gr.Request | None) -> str:
    return client_id(request)


INPUT_FORMATS = ("PNG", "JPEG", "WEBP")  # the formats an uploaded image is opened as (no other decoder runs)
# An image that decodes to far more than its file (a flat plane stored in a few kB) is refused before decoding.
MAX_DECOMPRESSION_RATIO = 256
MIN_RATIO_CHECKED_BYTES = 16 << 20


def check_uploaded_image(payload: Any, limits: Limits) -> Path | None:
    r"""
    The path of an uploaded image file (an `image` input that skipped Gradio's preprocessing), checked from its
    header only: nothing is decoded, so it is cheap enough to run before the client is admitted. Each side is bounded,
    and so is the decompression ratio of large images (decoded bytes per file byte).

    Gradio has already checked that the file is one uploaded to this server; it is checked again here to lie in
    Gradio's upload folder, and its size is read from its header.

    Args:
        payload (`dict`, *optional*): Gradio's file data (`{"path": ...}`).
        limits ([`Limits`]): Each side at most `MAX_INPUT_IMAGE_FACTOR x max_size`.
    """
    from gradio.utils import get_upload_folder

    if payload is None:
        return None
    path = payload.get("path") if isinstance(payload, dict) else None
    if not isinstance(path, str):
        raise ValueError("image must be an uploaded image file.")
    upload = Path(get_upload_folder()).resolve()
    resolved = Path(path).resolve()
    if upload not in resolved.parents or not resolved.is_file():
        raise ValueError("image must be a file uploaded to this server.")
    bound = MAX_INPUT_IMAGE_FACTOR * limits.max_size
    try:
        with Image.open(resolved, formats=INPUT_FORMATS) as im:
            width, height = im.size
    except (OSError, Image.DecompressionBombError):
        raise ValueError(f"The input image is not a readable {', '.join(INPUT_FORMATS)} file.") from None
    decoded, stored = width * height * 4, max(1, resolved.stat().st_size)  # up to 4 bytes a pixel once decoded
    if decoded > MIN_RATIO_CHECKED_BYTES and decoded / stored > MAX_DECOMPRESSION_RATIO:
        raise ValueError(
            f"The input image would decode to {decoded / stored:.0f} times its file size ({width}x{height} from "
            f"{stored} bytes); at most {MAX_DECOMPRESSION_RATIO} times is accepted for images over "
            f"{MIN_RATIO_CHECKED_BYTES >> 20} MB decoded."
        )
    if max(width, height) > bound:
        raise ValueError(
            f"The input image is {width}x{height}; each side may be at most {bound} "
            f"({MAX_INPUT_IMAGE_FACTOR} x max_size={limits.max_size}; the server's operator can raise it with "
            f"{Limits.flag('max_size')})."
        )
    return resolved


def decode_image(path: Path | None) -> Image.Image | None:
    """Decode an image that [`check_uploaded_image`] accepted (call it inside the client's admission)."""
    if path is None:
        return None
    try:
        with Image.open(path, formats=INPUT_FORMATS) as im:
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError):
        raise ValueError("The input image is not a readable image file.") from None
