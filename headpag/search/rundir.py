"""
The search run directory: the one module that knows its files, and every reader and writer goes through it.

A run folder holds:

- `config.json`: the settings and their hash (written when the run starts, after every check has passed);
- `journal.jsonl`: one record per finished candidate and stage (see [`~search.records`], [`~search.journal.Journal`]);
- `rounds/round_{r}.json`: the scores, the stages and the heads chosen in round `r` once it is complete;
- `rounds/round_{r}_gradients.json`: the gradient strategy's ranking of round `r`'s pool, with its cost;
- `selected_heads.json`: the selected heads as a head-set file (written when the run ends);
- `report/`: the report (`headpag hunt --report`);
- `.lock`: present while a run writes the folder (see [`~headpag._lock.FolderLock`]).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from diffusers.utils import logging

from .._io import atomic_write_json
from .._lock import FolderLock
from .config import SearchConfig
from .cost import Cost, check_cost
from .journal import read_journal
from .records import Head, _is_finite_number, _is_int, _short, check_head, mean_scores, pair_scores
from .strategies import Stage


logger = logging.get_logger(__name__)

CONFIG_NAME = "config.json"
JOURNAL_NAME = "journal.jsonl"
SELECTED_NAME = "selected_heads.json"
ROUNDS_DIR = "rounds"
REPORT_DIR = "report"
LOCK_NAME = ".lock"


class RunDirectory:
    r"""
    A HeadHunter run folder: where each of its files lives, and how each is read (validated) and written (atomically).

    Args:
        path (`str`): The folder (it need not exist yet).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    # ------------------------------------------------------------------ where things live
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL_NAME

    @property
    def selected_heads_path(self) -> Path:
        return self.path / SELECTED_NAME

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIR

    def round_path(self, round_index: int) -> Path:
        return self.path / ROUNDS_DIR / f"round_{round_index}.json"

    def gradients_path(self, round_index: int) -> Path:
        return self.path / ROUNDS_DIR / f"round_{round_index}_gradients.json"

    def confined(self, path: Path) -> Path:
        r"""
        `path`, a file of this run, after checking (before every write) that no link leads it out of the run folder:
        its folder must resolve inside the resolved run folder and the file itself must not be a link.

        Raises:
            `ValueError`: naming the run folder's name (not the path a link points to).
        """
        root, parent = self.path.resolve(), path.parent.resolve()
        if (parent != root and root not in parent.parents) or path.is_symlink():
            raise ValueError(
                f"Refusing to write {path.relative_to(self.path).as_posix()} of search run {self.path.name!r}: a link "
                "leads it out of the run folder. Remove the link (or use another run folder)."
            )
        return path

    def lock(self) -> FolderLock:
        """The lock that keeps the folder to one writing run."""
        return FolderLock(
            self.path, LOCK_NAME, owner="HeadHunter run", hint="wait for it to finish or use another --output-dir"
        )

    def exists(self) -> bool:
        """Whether the folder holds a run (a `config.json`)."""
        return self.config_path.is_file()

    # ------------------------------------------------------------------ the settings
    def read_config(self, max_bytes: int | None = None) -> dict[str, Any] | None:
        r"""
        The run's `config.json`, or `None` when there is none.

        Args:
            max_bytes (`int`, *optional*): Refuse a larger file (for readers that serve clients).

        Raises:
            `ValueError`: when the file is larger than `max_bytes`, or not a JSON object with a string
                `config_hash` (naming the file).
        """
        meta = self.config_path
        try:
            doc = json.loads(_read_bytes(meta, max_bytes).decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ValueError(f"{meta} is unreadable ({e}); remove it or use another output directory.") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("config_hash"), str):
            raise ValueError(
                f"{meta} is not a HeadHunter config (no 'config_hash'); remove it or use another output directory."
            )
        return doc

    def write_config(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.confined(self.config_path), meta)

    def remove_config(self) -> None:
        self.config_path.unlink(missing_ok=True)

    def num_pairs(self, meta: dict[str, Any] | None = None) -> int | None:
        """M of the run (from `meta`, its `config.json` content, or read); `None` when its settings form no search."""
        return run_num_pairs(self.read_config() if meta is None else meta)

    # ------------------------------------------------------------------ the journal
    def read_journal(self, config_hash: str | None = None, **checks: Any) -> list[dict[str, Any]]:
        """The valid records of the journal (see [`~search.journal.read_journal`])."""
        return read_journal(self.journal_path, config_hash, **checks)

    # ------------------------------------------------------------------ rounds
    def read_round_doc(self, round_index: int, max_bytes: int | None = None) -> Any:
        """The decoded round file, or `None` when missing or unreadable (no validation; see [`read_round`])."""
        try:
            return json.loads(_read_bytes(self.round_path(round_index), max_bytes).decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return None

    def read_round(self, round_index: int) -> tuple[dict[Head, float], list[Head], list[Head]] | None:
        r"""
        A round file's `(scores, chosen, selected)`, or `None` (with a logger warning naming the file and the reason)
        when it is missing, unreadable or malformed; see [`parse_round`].
        """
        path = self.round_path(round_index)
        try:
            doc = json.loads(path.read_bytes().decode("utf-8"))
            return parse_round(doc, round_index)
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            logger.warning("%s is invalid (%s); ignored.", path, e)
            return None

    def read_stages(self, round_index: int) -> list[Stage] | str | None:
        """The stages a round file records; why they cannot be read (a message); `None` when it records none."""
        doc = self.read_round_doc(round_index)
        if not isinstance(doc, dict):
            return "it is unreadable"
        raw = doc.get("stages")
        if raw is None:
            return None
        stages: list[Stage] = []
        for item in raw if isinstance(raw, list) else [None]:
            pairs = item.get("pairs") if isinstance(item, dict) else None
            heads = item.get("candidates") if isinstance(item, dict) else None
            proxy = item.get("proxy", False) if isinstance(item, dict) else None
            if (
                not isinstance(pairs, list)
                or not isinstance(heads, list)
                or not all(isinstance(h, list) and len(h) == 2 and check_head(*h) is None for h in heads)
                or not isinstance(proxy, bool)
            ):
                return "its stages are malformed"
            stages.append(Stage(pairs, [(h[0], h[1]) for h in heads], proxy=proxy))
        return stages

    def write_round(self, round_index: int, doc: dict[str, Any]) -> None:
        atomic_write_json(self.confined(self.round_path(round_index)), doc)

    # ------------------------------------------------------------------ the gradient strategy's rankings
    def write_gradients(
        self, round_index: int, selected: Sequence[Head], grad_steps: int, values: dict[Head, float], cost: Cost
    ) -> None:
        atomic_write_json(
            self.confined(self.gradients_path(round_index)),
            {
                "round": round_index,
                "selected": [list(h) for h in selected],
                "grad_steps": grad_steps,
                "gradients": [[l, h, g] for (l, h), g in sorted(values.items())],
                "cost": cost.to_dict(),
            },
        )

    def read_gradients(
        self, round_index: int, candidates: Sequence[Head], selected: Sequence[Head], grad_steps: int
    ) -> tuple[dict[Head, float], Cost] | str | None:
        r"""
        A round's gradient ranking and its cost when it is exactly the one asked for (same round, selected heads,
        candidates and `grad_steps`, finite values); why not (a message) when the file exists but is not; `None` when
        there is no file.
        """
        path = self.gradients_path(round_index)
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return "it is unreadable"
        if not isinstance(doc, dict):
            return "it is not a JSON object"
        rows = doc.get("gradients")
        if doc.get("round") != round_index:
            return "it belongs to another round"
        if doc.get("selected") != [list(h) for h in selected]:
            return "its selected heads are not this round's"
        if doc.get("grad_steps") != grad_steps:
            return "it was made with other grad_steps"
        if check_cost(doc.get("cost")) is not None:
            return "its cost is invalid"
        if not isinstance(rows, list):
            return "it holds no gradients"
        values: dict[Head, float] = {}
        for row in rows:
            ok = (
                isinstance(row, list)
                and len(row) == 3
                and check_head(row[0], row[1]) is None
                and _is_finite_number(row[2])
            )
            if not ok or (row[0], row[1]) in values:
                return "its gradients are malformed"
            values[(row[0], row[1])] = float(row[2])
        if set(values) != set(candidates):
            return "its heads are not this round's candidates"
        return values, Cost.from_dict(doc.get("cost"))

    def gradients_cost(self, rounds: Iterable[int]) -> Cost:
        """The cost written in the gradient files of `rounds` (missing or unreadable files count nothing)."""
        total = Cost()
        for r in rounds:
            path = self.gradients_path(r)
            try:
                doc = json.loads(path.read_bytes().decode("utf-8")) if path.exists() else None
            except (OSError, UnicodeDecodeError, ValueError, RecursionError):
                doc = None
            if isinstance(doc, dict):
                total = total + Cost.from_dict(doc.get("cost"))
        return total

    # ------------------------------------------------------------------ the selected heads
    def read_selected_doc(self) -> dict[str, Any] | None:
        """The decoded `selected_heads.json`, or `None` when missing or unreadable (warned)."""
        try:
            doc = json.loads(self.selected_heads_path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            logger.warning("%s is unreadable (%s); ignored.", self.selected_heads_path, e)
            return None
        return doc if isinstance(doc, dict) else None

    def ranked_heads(self) -> list[Head]:
        r"""
        The heads of the run in rank order: the full round-1 ranking from the journal (heads scored on more pairs
        first, which only matters for successive halving; then best mean score first, ties by `(layer, head)`), then
        any later-round selection in its selection order (from `selected_heads.json`).

        Raises:
            `ValueError`: when the folder holds no HeadHunter run or its journal no scored round-1 candidate.
        """
        config = self.read_config()
        if config is None:
            raise ValueError(f"{self.path} holds no HeadHunter run (no {CONFIG_NAME}).")
        num_pairs = run_num_pairs(config)
        records = self.read_journal(config["config_hash"], num_pairs=num_pairs)
        first = pair_scores(records, 0, num_pairs)
        means = mean_scores(first)
        ranking = sorted(means, key=lambda h: (-len(first[h]), -means[h], h))
        if not ranking:
            raise ValueError(f"The journal of {self.path} has no scored round-1 candidate yet.")
        doc = self.read_selected_doc() or {}
        provenance = doc.get("provenance")
        selected = provenance.get("order", []) if isinstance(provenance, dict) else []
        seen = set(ranking)
        for item in selected if isinstance(selected, list) else []:
            head = tuple(item) if isinstance(item, list) and len(item) == 2 else None
            if head is not None and all(_is_int(v) for v in head) and head not in seen:
                ranking.append(head)
                seen.add(head)
        return ranking

    def top_k_heads(self, k: int) -> list[Head]:
        """The `k` best heads of the run (see [`ranked_heads`]); refused when `k` exceeds what the run ranked."""
        ranking = self.ranked_heads()
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(ranking):
            raise ValueError(f"top_k={k}: the run {self.path} ranked {len(ranking)} heads; use 1 to {len(ranking)}.")
        return ranking[:k]

    # ------------------------------------------------------------------ cleanup
    def remove_if_empty(self) -> None:
        """Remove the folder when it is empty (cleanup of a run that failed before writing anything)."""
        try:
            self.path.rmdir()
        except OSError:
            pass


def _read_bytes(path: Path, max_bytes: int | None) -> bytes:
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise ValueError(f"{path.name} is larger than {max_bytes} bytes")
    return path.read_bytes()


def parse_round(doc: Any, round_index: int | None = None) -> tuple[dict[Head, float], list[Head], list[Head]]:
    r"""
    Check the structure of a decoded `rounds/round_{r}.json` and return `(scores, chosen, selected)`.

    Args:
        doc: The decoded JSON.
        round_index (`int`, *optional*): The round the file must describe.

    Raises:
        `ValueError`: naming what is wrong (wrong round, non-finite score, duplicate head, a chosen head without a
        score, ...).
    """
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if round_index is not None and (not _is_int(doc.get("round")) or doc["round"] != round_index):
        raise ValueError(f"'round' is {doc.get('round')!r}, expected {round_index}")

    def heads(key: str) -> list[Head]:
        value = doc.get(key)
        if not isinstance(value, list):
            raise ValueError(f"{key!r} must be a list")
        out = []
        for item in value:
            if not isinstance(item, list) or len(item) != 2 or check_head(*item):
                raise ValueError(f"{key!r} holds {_short(item)}, not a [layer, head] pair")
            out.append((item[0], item[1]))
        if len(set(out)) != len(out):
            raise ValueError(f"{key!r} names a head twice")
        return out

    raw = doc.get("scores")
    if not isinstance(raw, list) or not raw:
        raise ValueError("'scores' must be a non-empty list")
    scores: dict[Head, float] = {}
    for item in raw:
        if not isinstance(item, list) or len(item) != 3 or check_head(item[0], item[1]):
            raise ValueError(f"'scores' holds {_short(item)}, not a [layer, head, score] triple")
        if not _is_finite_number(item[2]):
            raise ValueError(f"'scores' holds a non-finite score for head {item[0]}.{item[1]}")
        if (item[0], item[1]) in scores:
            raise ValueError(f"'scores' names head {item[0]}.{item[1]} twice")
        scores[(item[0], item[1])] = float(item[2])
    chosen, selected = heads("chosen"), heads("selected")
    if any(h not in scores for h in chosen):
        raise ValueError("a chosen head has no score")
    if selected[len(selected) - len(chosen) :] != chosen:
        raise ValueError("'selected' does not end with 'chosen'")
    return scores, chosen, selected


def run_num_pairs(meta: dict[str, Any] | None) -> int | None:
    """M of a run's `config.json` content (`None` when its settings do not form a search)."""
    settings = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(settings, dict):
        return None
    try:
        return len(SearchConfig.from_dict(settings).pairs())
    except (TypeError, ValueError):
        return None
