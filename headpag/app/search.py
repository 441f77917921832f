"""
HeadHunter in the background of the UI: one search at a time on the loaded model, its progress and heatmap readable
at any moment, resumable from its run directory.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from diffusers.utils import logging
from PIL import Image

from ..search.config import SearchConfig
from ..search.journal import read_journal
from .heads_grid import render_grid
from .host import ModelHost


logger = logging.get_logger(__name__)


class SearchJob:
    r"""
    A HeadHunter run in a background thread. Each search batch holds the model lock, so generations interleave
    between batches.

    Args:
        host ([`ModelHost`]): The loaded model.
        config ([`SearchConfig`]): The settings.
        output_dir (`str`): The run directory (an existing one with the same settings resumes).
        objective (`str`): `"clip"` or `"pickscore"`.
        objective_model, objective_arch (`str`, *optional*): As for `headpag hunt`.
    """

    def __init__(
        self,
        host: ModelHost,
        config: SearchConfig,
        output_dir: str | Path,
        objective: str = "clip",
        objective_model: str | None = None,
        objective_arch: str | None = None,
    ):
        self.host, self.config, self.output_dir = host, config, Path(output_dir)
        self.objective, self.objective_model, self.objective_arch = objective, objective_model, objective_arch
        self.done = self.total = 0
        self.status = "starting"
        self.result = None
        self.error: str | None = None
        self.started = time.monotonic()
        self.config_hash = config.config_hash(host.model_name or "")
        self.layout = host.layout
        self._thread = threading.Thread(target=self._run, name="headpag-search", daemon=True)

    def start(self) -> SearchJob:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

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
                lock=self.host.lock.held_by("search"),
            )
            self.status = "running"
            self.result = hunter.run()
            write_report(self.output_dir, self.layout.num_layers, self.layout.num_heads)
            self.status = "done"
        except Exception as e:  # noqa: BLE001 - shown in the UI; the app keeps serving
            logger.warning("search failed: %s", e)
            self.error = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            self.status = "failed"

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
            "output_dir": str(self.output_dir),
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
        if s["selected"]:
            line += f"\n\nSelected so far: `{s['selected']}`"
        line += f"\n\nRun directory: `{s['output_dir']}`"
        return line


def config_from_run_dir(run_dir: str | Path) -> SearchConfig:
    """The settings of an existing run directory (to resume it)."""
    meta = Path(run_dir) / "config.json"
    if not meta.is_file():
        raise ValueError(f"{run_dir} is not a HeadHunter run directory: it has no config.json.")
    return SearchConfig(**json.loads(meta.read_text())["config"])


def run_scores(
    run_dir: str | Path, config_hash: str | None = None
) -> tuple[int, dict[tuple[int, int], float], list[tuple[int, int]]]:
    r"""
    The latest round of a run directory: `(round, {(layer, head): score} so far, heads selected up to it)`.

    Args:
        run_dir (`str`): A HeadHunter run directory.
        config_hash (`str`, *optional*): Read from its `config.json` when not given.
    """
    run = Path(run_dir)
    if config_hash is None:
        meta = run / "config.json"
        if not meta.is_file():
            raise ValueError(f"{run} is not a HeadHunter run directory (no config.json).")
        config_hash = json.loads(meta.read_text())["config_hash"]
    records = read_journal(run / "journal.jsonl", config_hash)
    current = max((r["round"] for r in records), default=0)
    selected: list[tuple[int, int]] = []
    for r in range(current + 1):
        round_file = run / "rounds" / f"round_{r}.json"
        if round_file.exists():
            selected = [tuple(h) for h in json.loads(round_file.read_text())["selected"]]
    scores = {(x["layer"], x["head"]): x["score"] for x in records if x["round"] == current}
    return current, scores, selected
