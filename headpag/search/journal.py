"""The search journal: one JSON line per finished candidate, appended and fsynced as soon as its score is known."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._io import atomic_write_json


class Journal:
    r"""
    `output_dir/journal.jsonl` plus `output_dir/config.json`.

    A line is written with a single `write` on a file opened in append mode and fsynced, so a run killed at any
    moment loses at most the candidates in flight; a torn last line (a kill inside the write) is ignored on reading.

    Args:
        output_dir (`str`): The run directory.
        config_hash (`str`): Hash of the settings; a directory holding another hash is refused.
        config (`dict`): The settings, written to `config.json` for people and for `--report`.
    """

    def __init__(self, output_dir: str | os.PathLike, config_hash: str, config: dict[str, Any] | None = None):
        self.dir = Path(output_dir)
        self.path = self.dir / "journal.jsonl"
        self.config_hash = config_hash
        meta = self.dir / "config.json"
        if meta.exists():
            existing = json.loads(meta.read_text())
            if existing.get("config_hash") != config_hash:
                raise ValueError(
                    f"{self.dir} holds a search with different settings (config hash {existing.get('config_hash')} "
                    f"!= {config_hash}); use another --output-dir or the same settings to resume it."
                )
        elif config is not None:
            atomic_write_json(meta, {"config_hash": config_hash, "config": config})

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps({**record, "config_hash": self.config_hash}, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        return read_journal(self.path, self.config_hash)

    def scores(self, round_index: int) -> dict[tuple[int, int], float]:
        """`{(layer, head): mean score}` of the candidates finished in a round."""
        return {(r["layer"], r["head"]): r["score"] for r in self.records() if r["round"] == round_index}


def read_journal(path: str | os.PathLike, config_hash: str | None = None) -> list[dict[str, Any]]:
    """Valid records of a journal file (torn or foreign lines skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if config_hash is None or record.get("config_hash") == config_hash:
            out.append(record)
    return out
