"""
HeadHunter in the background of the UI: one search at a time on the loaded model, its progress and heatmap readable
at any moment, cancellable between batches by the client that started it, resumable by run name.
"""

from __future__ import annotations

import threading
import time
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from diffusers.utils import logging
from PIL import Image

from ..options import Limits
from ..runtime import TransformerLayout
from ..search.config import SearchConfig
from ..search.records import mean_scores, pair_scores
from ..search.rundir import RunDirectory
from ..search.strategies import projected_work
from . import inputs
from .heads_grid import render_grid
from .host import ModelHost, ModelLock
from .roots import Roots


logger = logging.get_logger(__name__)


def meta_bytes(limits: Limits | None = None) -> int:
    """
    The largest `config.json` or round file the UI reads: what a run within `limits` can write (every prompt at its
    longest length, JSON-escaped at up to 6 bytes a character; every seed; every head of the pool), plus 1 MB.
    """
    limits = limits or Limits()
    prompts = (limits.max_prompts + 2) * (6 * limits.max_prompt_chars + 4)
    return prompts + 24 * limits.max_seeds + 64 * limits.max_pool + (1 << 20)


def _json_types(hint: Any) -> tuple[type, ...]:
    """The JSON value types a `SearchConfig` field of type `hint` reads back from `config.json`."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return tuple(t for arg in typing.get_args(hint) for t in _json_types(arg))
    origin = typing.get_origin(hint) or hint
    if origin is type(None):
        return (type(None),)
    if origin is float:
        return (int, float)
    if origin in (list, tuple):
        return (list,)
    return (origin,)


def config_types() -> dict[str, tuple[type, ...]]:
    """`{field: JSON types}` of every [`SearchConfig`] field, derived from its type hints."""
    hints = typing.get_type_hints(SearchConfig)
    return {f.name: _json_types(hints[f.name]) for f in fields(SearchConfig)}


class SearchCancelled(Exception):
    """Raised at the start of a search batch once the search was cancelled (every finished candidate is journaled)."""


class _CancellableHold:
    """The model lock for HeadHunter's batches: refuses to start another batch once `cancelled` is set or the job's
    time is up."""

    def __init__(self, lock: ModelLock, cancelled: threading.Event, job: SearchJob | None = None):
        self.lock, self.cancelled, self.job = lock, cancelled, job

    def __enter__(self):
        if self.job is not None and self.job.deadline is not None and time.monotonic() > self.job.deadline:
            self.job.stop("its time limit (max_search_hours) passed")
        if self.cancelled.is_set():
            raise SearchCancelled("Search cancelled.")
        self.lock.acquire("search")
        if self.cancelled.is_set():
            self.lock.release()
            raise SearchCancelled("Search cancelled.")
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


class SearchJob:
    r"""
    A HeadHunter run in a background thread. Each search batch holds the model lock, so generations interleave
    between batches; [`~SearchJob.cancel`] stops the run before its next batch.

    Args:
        host ([`ModelHost`]): The loaded model.
        config ([`SearchConfig`]): The settings.
        output_dir (`str`): The run directory (an existing one with the same settings resumes).
        objective (`str`): `"clip"` or `"pickscore"`.
        objective_model, objective_arch (`str`, *optional*): As for `headpag hunt` (already resolved to server paths
            or names).
        name (`str`, *optional*): The run's name, as clients see it (default: the folder name).
        owner (`str`, *optional*): The client that started it (only it may cancel).
        on_end (`Callable[[], None]`, *optional*): Called once when the thread ends (releases the admission ticket).
        roots ([`Roots`], *optional*): Server paths in error messages are replaced by their root's name.
        max_hours (`float`, *optional*): Stop before the first batch after this long.
        grace_s (`float`, *optional*): Cancel the job when nobody has followed it for this long (see
            [`~SearchJob.unwatched`]).
    """

    def __init__(
        self,
        host: ModelHost,
        config: SearchConfig,
        output_dir: str | Path,
        objective: str = "clip",
        objective_model: str | None = None,
        objective_arch: str | None = None,
        name: str | None = None,
        owner: str | None = None,
        on_end=None,
        roots: Roots | None = None,
        max_hours: float | None = None,
        grace_s: float | None = None,
    ):
        self.host, self.config, self.output_dir = host, config, Path(output_dir)
        self.objective, self.objective_model, self.objective_arch = objective, objective_model, objective_arch
        self.name, self.owner, self.on_end, self.roots = name or self.output_dir.name, owner, on_end, roots
        self.done = self.total = 0
        self.status = "starting"
        self.result = None
        self.error: str | None = None
        self.started = time.monotonic()
        self.config_hash = config.config_hash(host.model_name or "")
        self.layout = host.layout
        self.cancelled = threading.Event()
        self.reason: str | None = None  # why it stopped, when not by its owner
        self.deadline = None if max_hours is None else self.started + max_hours * 3600
        self.grace_s = grace_s
        self.watchers = 0
        self._left = 0  # how many times the last follower left (a timer acts only for the latest departure)
        self._watch_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="headpag-search", daemon=True)

    def start(self) -> SearchJob:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def cancel(self) -> None:
        """Stop before the next batch (the batch in flight finishes and is journaled)."""
        self.cancelled.set()
        if self.status == "running":
            self.status = "cancelling"

    def stop(self, reason: str) -> None:
        """Cancel for `reason` (a time limit, an operator, a client that left), which the status then shows."""
        self.reason = self.reason or reason
        logger.warning("search %s stopped: %s", self.name, reason)
        self.cancel()

    def watched(self) -> None:
        """A client follows the job's progress."""
        with self._watch_lock:
            self.watchers += 1

    def unwatched(self) -> None:
        """A client stopped following (it left, or the job ended); with nobody left, the grace period starts."""
        with self._watch_lock:
            self.watchers -= 1
            if self.watchers > 0 or not self.running or self.grace_s is None:
                return
            self._left += 1
            departure = self._left
        timer = threading.Timer(self.grace_s, self._cancel_if_unwatched, args=(departure,))
        timer.daemon = True
        timer.start()

    def _cancel_if_unwatched(self, departure: int) -> None:
        with self._watch_lock:
            if self.watchers == 0 and self.running and departure == self._left:
                self.stop(f"nobody followed it for {self.grace_s / 60:g} min (search_grace_min)")

    def _progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def _message(self, error: Exception) -> str:
        if isinstance(error, UnicodeError):  # its message quotes the bytes it could not decode
            return "a file could not be read as text (not UTF-8)"
        if isinstance(error, ValueError):
            text = str(error)
            return self.roots.redact(text) if self.roots else text
        return f"{type(error).__name__} (the server log has the details)"

    def _run(self) -> None:
        from ..search import HeadHunter
        from ..search.report import write_report

        try:
            self.status = "loading the objective"
            hunter = HeadHunter(
                self.host.require(),
                self.objective,
                self.config,
                self.output_dir,
                objective_model=self.objective_model,
                objective_arch=self.objective_arch,
                model_name=self.host.model_name or "",
                progress=self._progress,
                lock=_CancellableHold(self.host.lock, self.cancelled, self),
            )
            if self.cancelled.is_set():
                raise SearchCancelled("Search cancelled.")
            self.status = "running"
            self.result = hunter.run()
            write_report(self.output_dir, self.layout.num_layers, self.layout.num_heads)
            self.status = "done"
        except SearchCancelled:
            self.status = "cancelled"
        except Exception as e:  # noqa: BLE001 - shown in the UI; the app keeps serving
            logger.warning("search %s failed: %s", self.name, e)
            self.error = self._message(e)
            self.status = "failed"
        finally:
            if self.on_end is not None:
                self.on_end()

    # ------------------------------------------------------------------ what the UI shows
    def scores(self) -> tuple[int, dict[tuple[int, int], float], list[tuple[int, int]]]:
        """(current round, its scores so far, heads selected before it)."""
        return run_scores(self.output_dir, self.config_hash)

    def heatmap(self) -> Image.Image:
        current, scores, selected = self.scores()
        layout = self.layout
        return render_grid(layout.num_layers, layout.num_heads, set(selected), scores, layout.num_double_blocks)

    def summary(self) -> dict[str, Any]:
        current, scores, selected = self.scores()
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
        left = (self.total - self.done) / rate if rate else None
        return {
            "status": self.status,
            "round": current,
            "done": self.done,
            "total": self.total,
            "rate": rate,
            "seconds_left": left,
            "selected": "" if not selected else ", ".join(f"{l}.{h}" for l, h in selected),
            "error": self.error,
            "run": self.name,
            "owner": self.owner,
            "reason": self.reason,
            "elapsed_s": round(elapsed, 1),
        }

    def markdown(self) -> str:
        s = self.summary()
        if s["status"] == "failed":
            return f"**Search failed:** {s['error']}"
        waiting = self.host.lock.holder not in (None, "search") and s["status"] == "running"
        line = f"**{s['status']}** · round {s['round'] + 1}/{self.config.rounds} · {s['done']}/{s['total']} candidates"
        if s["rate"]:
            line += f" · {s['rate']:.2f} cand/s"
        if s["seconds_left"] is not None and s["status"] == "running":
            line += f" · ~{s['seconds_left']:.0f}s left"
        if waiting:
            line += f" · waiting for the {self.host.lock.holder} job"
        if s["status"] == "cancelled":
            if s["reason"]:
                line += f" · stopped: {s['reason']}"
            line += " · every finished candidate is in the journal; *Resume run* continues it"
        if s["selected"]:
            line += f"\n\nSelected so far: `{s['selected']}`"
        line += f"\n\nRun: `{s['run']}`"
        return line


def read_run_meta(run_dir: Path, name: str, limits: Limits | None = None) -> dict[str, Any]:
    r"""
    The `config.json` of a run folder, checked field by field against [`SearchConfig`]'s fields and types; a
    `ValueError` that quotes nothing from the file when it is not one HeadHunter wrote.

    Args:
        run_dir (`Path`): The (resolved, contained) run folder.
        name (`str`): The run's name, for messages.
        limits ([`Limits`], *optional*): The server's limits (they bound the file's size, see [`meta_bytes`]).
    """
    invalid = ValueError(
        f"Search run {name!r} is not a valid HeadHunter run folder (its config.json is missing or malformed)."
    )
    try:
        meta = RunDirectory(run_dir).read_config(max_bytes=meta_bytes(limits))
    except ValueError:
        raise invalid from None
    if meta is None:
        raise invalid
    config, allowed = meta.get("config"), config_types()
    if not isinstance(config, dict) or set(config) - set(allowed):
        raise invalid
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, allowed[key]):
            raise invalid
    if not all(isinstance(p, str) for p in config.get("prompts", [])):
        raise invalid
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in config.get("seeds", [])):
        raise invalid
    return meta


def check_search(values: dict[str, Any], num_layers: int, num_heads: int, limits: Limits) -> None:
    r"""
    Refuse a search over a limit before anything is built or expanded (a new search's values, or a resumed run's
    `config.json`): prompts, seeds, prompt-seed pairs, rounds, the pool (against the model's grid), steps, size,
    scales and batch size, each refusal naming the limit and its flag.

    Args:
        values (`dict`): [`SearchConfig`] fields (missing ones take its defaults).
        num_layers, num_heads (`int`): The loaded model's grid.
        limits ([`Limits`]): The server's limits.
    """
    defaults = SearchConfig.__dataclass_fields__
    get = lambda key: values.get(key, defaults[key].default if key != "seeds" else [0])  # noqa: E731
    prompts, seeds = values.get("prompts") or [], get("seeds")
    if not prompts:
        raise ValueError("Give at least one prompt (one per line).")
    limits.check_count("number of prompts", len(prompts), "max_prompts")
    for prompt in prompts:
        inputs.text(prompt, "a prompt", limits)
    limits.check_count("number of seeds", len(seeds), "max_seeds")
    for seed in seeds:
        inputs.integer(seed, "seed", minimum=0, maximum=2**63 - 1)
    pairs = len(prompts) * len(seeds) if get("pairing") == "product" else len(prompts)
    limits.check_count("number of prompt-seed pairs", pairs, "max_pairs")
    inputs.integer(get("rounds"), "rounds", minimum=1, limits=limits, limit="max_rounds")
    inputs.integer(get("top_k"), "top_k", minimum=1, limits=limits, limit="max_pool")
    _, pool_size = inputs.pool(get("pool") or "", num_layers, num_heads, limits)
    inputs.integer(get("num_inference_steps"), "num_inference_steps", minimum=1, limits=limits, limit="max_steps")
    inputs.size(get("height"), "height", limits)
    inputs.size(get("width"), "width", limits)
    inputs.number(get("pag_scale"), "pag_scale", minimum=0, limits=limits, limit="max_scale")
    inputs.number(get("pag_identity_weight"), "pag_identity_weight", minimum=0, maximum=1)
    inputs.integer(get("pag_reuse"), "pag_reuse", minimum=1, maximum=get("num_inference_steps"))
    inputs.number(get("guidance_scale"), "guidance_scale", minimum=0, limits=limits, limit="max_scale")
    inputs.number(get("true_cfg_scale"), "true_cfg_scale", minimum=0, limits=limits, limit="max_scale")
    inputs.integer(get("batch_size"), "batch_size", minimum=1, limits=limits, limit="max_images")
    inputs.text(get("style_prompt"), "style_prompt", limits)
    inputs.text(get("negative_prompt"), "negative_prompt", limits)
    if get("max_sequence_length") is not None:
        inputs.integer(get("max_sequence_length"), "max_sequence_length", minimum=1, maximum=512)
    for name in ("proxy_steps", "grad_steps"):  # the other fidelities' steps, bounded like the main one
        if get(name) is not None:
            inputs.integer(get(name), name, minimum=1, limits=limits, limit="max_steps")
    if get("proxy_size") is not None:
        inputs.size(get("proxy_size"), "proxy_size", limits)
    config = SearchConfig(**{f.name: values[f.name] for f in fields(SearchConfig) if f.name in values})
    limits.check_search_budget(*projected_work(config, pool_size))


def config_from_run_dir(
    run_dir: str | Path,
    name: str | None = None,
    layout: TransformerLayout | None = None,
    limits: Limits | None = None,
) -> SearchConfig:
    r"""
    The settings of an existing run folder (to resume it); a `ValueError` quoting nothing from its files.

    Args:
        run_dir (`str`): The run folder. name (`str`, *optional*): Its name, for messages.
        layout (`TransformerLayout`, *optional*), limits ([`Limits`], *optional*): When given, the settings are
            checked against the model's grid and the limits (see [`check_search`]) before they are built.
    """
    run_dir = Path(run_dir)
    name = name or run_dir.name
    meta = read_run_meta(run_dir, name, limits)
    if layout is not None:
        check_search(meta["config"], layout.num_layers, layout.num_heads, limits or Limits())
    try:
        return SearchConfig(
            **{f.name: meta["config"][f.name] for f in fields(SearchConfig) if f.name in meta["config"]}
        )
    except (TypeError, ValueError):
        raise ValueError(
            f"Search run {name!r} is not a valid HeadHunter run folder (its settings do not form a search)."
        ) from None


def run_scores(
    run_dir: str | Path, config_hash: str | None = None, name: str | None = None, limits: Limits | None = None
) -> tuple[int, dict[tuple[int, int], float], list[tuple[int, int]]]:
    r"""
    The latest round of a run directory: `(round, {(layer, head): score} so far, heads selected up to it)`.

    Args:
        run_dir (`str`): A HeadHunter run directory.
        config_hash (`str`, *optional*): Read from its `config.json` when not given.
        name (`str`, *optional*): The run's name, for messages.
        limits ([`Limits`], *optional*): The server's limits (see [`read_run_meta`]).
    """
    run = RunDirectory(run_dir)
    if config_hash is None:
        config_hash = read_run_meta(run.path, name or run.path.name, limits)["config_hash"]
    records = run.read_journal(config_hash)
    current = max((r["round"] for r in records), default=0)
    selected: list[tuple[int, int]] = []
    for r in range(current + 1):
        doc = run.read_round_doc(r, max_bytes=meta_bytes(limits))
        heads = doc.get("selected") if isinstance(doc, dict) else None
        if isinstance(heads, list) and all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in h)
            for h in heads
        ):
            selected = [tuple(h) for h in heads]
    # A head's mean over every pair it was scored on (halving scores survivors on more pairs stage by stage).
    scores = mean_scores(pair_scores(records, current))
    return current, scores, selected
