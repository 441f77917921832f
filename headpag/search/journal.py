"""
The search journal: one JSON line per finished candidate and stage, appended and fsynced as soon as its scores are
known, read back through a validating reader; and the run lock that keeps a run folder to one writer.

A run folder holds:

- `config.json`: the settings and their hash (written when the run starts, after every check has passed);
- `journal.jsonl`: one record per candidate and stage, `{"round", "layer", "head", "score", "scores", "cost",
  "config_hash"}`, plus `"stage"` and `"pairs"` (the pair indices of `"scores"`) when the stage did not render every
  pair (successive halving); without `"pairs"` a record's `"scores"` are the pairs `0 .. M-1`. `"score"` is the mean
  of the record's `"scores"`, `"cost"` the work the record took (see [`~search.cost.Cost`]). Runs with a proxy
  fidelity (`proxy_size` / `proxy_steps`) add `"fidelity": {"proxy", "height", "width", "steps"}` to every record, the
  fidelity its scores were made at; a record without it is at the configured (full) fidelity. Scores of one fidelity
  are never merged with the other's (see [`pair_scores`]);
- `rounds/round_{r}.json`: the scores, the stages and the heads chosen in round `r` once it is complete;
- `.lock`: present while a run writes the folder (owner's pid, hostname, process start time, a random token).
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Container, Iterable
from pathlib import Path
from typing import Any

from diffusers.utils import logging

from .._io import atomic_write_json
from .config import SearchConfig
from .cost import Cost, check_cost


try:  # advisory locks serialize the appends of the processes of one run (not on Windows)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


logger = logging.get_logger(__name__)

Head = tuple[int, int]
JOURNAL_NAME = "journal.jsonl"
CONFIG_NAME = "config.json"
LOCK_NAME = ".lock"
# A layer or head index this large is no transformer's: refused when the model's size is unknown (grid memory).
MAX_INDEX = 4096
REQUIRED_KEYS = ("round", "layer", "head", "score")


# ---------------------------------------------------------------------------------------------------- validation
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any, limit: int = 40) -> str:
    """A short JSON-ish rendering of a decoded value, for messages (never raises)."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_pool(pool: Container[Head]) -> str:
    text = str(pool) if not isinstance(pool, (set, frozenset, list, tuple)) else f"{len(pool)} heads"
    return text if len(text) <= 80 else text[:77] + "..."


def check_head(
    layer: Any,
    head: Any,
    pool: Container[Head] | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
) -> str | None:
    r"""
    Why `(layer, head)` cannot be a candidate of a run, or `None` when it can.

    Args:
        layer, head: The indices to check (ints >= 0).
        pool (`Container[tuple[int, int]]`, *optional*): The run's candidate pool (a set of pairs or a [`HeadSet`]).
        num_layers, num_heads (`int`, *optional*): The model's size; when unknown, indices above `MAX_INDEX` are
            refused.
    """
    for name, value, limit in (("layer", layer, num_layers), ("head", head, num_heads)):
        if not _is_int(value) or value < 0:
            return f"{name} must be an int >= 0, got {value!r}"
        if limit is not None and value >= limit:
            return f"{name} {value} does not exist in the model ({limit} {name}s: 0-{limit - 1})"
        if limit is None and value > MAX_INDEX:
            return f"{name} {value} is implausibly large (> {MAX_INDEX})"
    if pool is not None and (layer, head) not in pool:
        return f"head {layer}.{head} is outside the run's pool ({_describe_pool(pool)})"
    return None


def check_record(
    record: Any,
    config_hash: str | None = None,
    rounds: int | None = None,
    pool: Container[Head] | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    num_pairs: int | None = None,
) -> str | None:
    r"""
    Why a journal record is invalid, or `None` when it is valid.

    A valid record is a JSON object with `round` (int >= 0, below `rounds` when given), `layer` and `head` (ints,
    inside the model and the pool when given), `score` (a finite number), optionally `scores` (a list of finite
    numbers), `stage` (an int >= 0), `pairs` (with `scores`: as many distinct pair indices >= 0, below `num_pairs`
    when given; without it, `scores` must hold `num_pairs` scores when given), `cost` (an object of finite numbers
    >= 0: `row_evals`, `images`, `seconds`), and `config_hash` equal to the run's when `config_hash` is given.

    Args:
        record: A decoded JSON value.
        config_hash (`str`, *optional*): The run's settings hash.
        rounds (`int`, *optional*): The configured number of rounds.
        pool, num_layers, num_heads: See [`check_head`].
        num_pairs (`int`, *optional*): M, the run's prompt-seed pairs.
    """
    if not isinstance(record, dict):
        return f"not a JSON object (got {_short(record)})"
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if config_hash is not None and "config_hash" not in record:
        missing.append("config_hash")
    if missing:
        return "missing key" + ("s " if len(missing) > 1 else " ") + ", ".join(repr(k) for k in missing)
    if config_hash is not None and record["config_hash"] != config_hash:
        return f"config hash {record['config_hash']!r} is not this run's ({config_hash!r})"
    r = record["round"]
    if not _is_int(r) or r < 0:
        return f"round must be an int >= 0, got {r!r}"
    if rounds is not None and r >= rounds:
        return f"round {r} is unknown: the run has {rounds} round{'s' if rounds != 1 else ''} (0-{rounds - 1})"
    problem = check_head(record["layer"], record["head"], pool, num_layers, num_heads)
    if problem:
        return problem
    if not _is_finite_number(record["score"]):
        return f"score must be a finite number, got {record['score']!r}"
    if "scores" in record:
        scores = record["scores"]
        if not isinstance(scores, list) or not scores or not all(_is_finite_number(s) for s in scores):
            return f"scores must be a non-empty list of finite numbers, got {_short(scores, 60)}"
    if "stage" in record and (not _is_int(record["stage"]) or not 0 <= record["stage"] <= MAX_INDEX):
        return f"stage must be an int >= 0, got {_short(record['stage'])}"
    if "pairs" in record:
        pairs = record["pairs"]
        if "scores" not in record:
            return "pairs without scores"
        if (
            not isinstance(pairs, list)
            or not all(_is_int(j) and j >= 0 for j in pairs)
            or len(set(pairs)) < len(pairs)
        ):
            return f"pairs must be a list of distinct ints >= 0, got {_short(pairs, 60)}"
        if len(pairs) != len(record["scores"]):
            return f"pairs name {len(pairs)} pairs but scores hold {len(record['scores'])}"
        if num_pairs is not None and any(j >= num_pairs for j in pairs):
            return f"pairs {_short(pairs, 60)} name a pair the run lacks ({num_pairs} pairs: 0-{num_pairs - 1})"
    elif "scores" in record and num_pairs is not None and len(record["scores"]) != num_pairs:
        return f"scores hold {len(record['scores'])} scores but the run has {num_pairs} pairs (and no 'pairs' key)"
    if "cost" in record:
        problem = check_cost(record["cost"])
        if problem:
            return problem
    if "fidelity" in record:
        problem = check_fidelity(record["fidelity"])
        if problem:
            return problem
    return None


def check_fidelity(doc: Any) -> str | None:
    """Why a record's `"fidelity"` is invalid, or `None`: `{"proxy": bool, "height", "width", "steps": int >= 1}`."""
    if not isinstance(doc, dict) or not isinstance(doc.get("proxy"), bool):
        return f"fidelity must be a JSON object with a boolean 'proxy', got {_short(doc)}"
    for key in ("height", "width", "steps"):
        if not _is_int(doc.get(key)) or not 1 <= doc[key] <= 1 << 20:
            return f"fidelity {key!r} must be an int >= 1, got {_short(doc.get(key))}"
    return None


def is_proxy(record: dict[str, Any]) -> bool:
    """Whether a (valid) record's scores were made at the proxy fidelity."""
    fidelity = record.get("fidelity")
    return isinstance(fidelity, dict) and fidelity.get("proxy") is True


def record_key(record: dict[str, Any]) -> tuple[int, int, int, int]:
    """`(round, layer, head, stage)`: what makes a (valid) record unique in a journal."""
    return record["round"], record["layer"], record["head"], record.get("stage", 0)


def record_pairs(record: dict[str, Any], num_pairs: int | None = None) -> dict[int, float]:
    r"""
    `{pair index: score}` of a valid record: its `pairs` and `scores`; `scores` without `pairs` are the pairs
    `0 .. len(scores)-1`; a record with only a mean `score` counts as that score on each of the `num_pairs` pairs
    (one pair when unknown).

    Args:
        record (`dict`): A record that passed [`check_record`].
        num_pairs (`int`, *optional*): M.
    """
    if "scores" not in record:
        return {j: float(record["score"]) for j in range(num_pairs or 1)}
    pairs = record.get("pairs", range(len(record["scores"])))
    return {j: float(s) for j, s in zip(pairs, record["scores"])}


def pair_scores(
    records: Iterable[dict[str, Any]], round_index: int, num_pairs: int | None = None, proxy: bool | None = None
) -> dict[Head, dict[int, float]]:
    r"""
    `{(layer, head): {pair index: score}}` of one round, merged over the round's records (stages) in file order; a
    pair named by two records keeps the first record's score. Scores of the two fidelities are never merged.

    Args:
        records (`list[dict]`): Valid records (from [`read_journal`] or [`scan_journal`]).
        round_index (`int`): The round.
        num_pairs (`int`, *optional*): M (see [`record_pairs`]).
        proxy (`bool`, *optional*): `False`: full-fidelity scores only; `True`: proxy scores only; `None` (default):
            each head's full-fidelity scores when it has any, else its proxy scores (what the round reports).
    """
    by_fidelity: dict[bool, dict[Head, dict[int, float]]] = {False: {}, True: {}}
    for record in records:
        if record["round"] != round_index:
            continue
        known = by_fidelity[is_proxy(record)].setdefault((record["layer"], record["head"]), {})
        for j, score in record_pairs(record, num_pairs).items():
            known.setdefault(j, score)
    if proxy is not None:
        return by_fidelity[proxy]
    full = by_fidelity[False]
    return {**{h: v for h, v in by_fidelity[True].items() if h not in full}, **full}


def mean_scores(pairs: dict[Head, dict[int, float]]) -> dict[Head, float]:
    """Each head's mean over the pairs it was scored on (summed in pair order, like the search does)."""
    return {head: sum(known[j] for j in sorted(known)) / len(known) for head, known in pairs.items() if known}


def journal_cost(records: Iterable[dict[str, Any]], round_index: int | None = None) -> Cost:
    """The work journaled in `records` (of one round, or of all)."""
    total = Cost()
    for record in records:
        if round_index is None or record["round"] == round_index:
            total = total + Cost.from_dict(record.get("cost"))
    return total


# ---------------------------------------------------------------------------------------------------- reading
def scan_journal(
    path: str | os.PathLike,
    config_hash: str | None = None,
    rounds: int | None = None,
    pool: Container[Head] | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    num_pairs: int | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    r"""
    The valid records of a journal file and one message per line that was skipped.

    Lines are read as bytes, so nothing in the file (binary garbage, invalid UTF-8, `null`, deep nesting, NaN) can
    raise. A line is skipped, with a message naming it and the reason, when it is not UTF-8 JSON, fails
    [`check_record`], or is the file's unterminated last line (a record counts once its `"\n"` is on disk: a last
    line without one is a write in progress or one cut by a kill, and [`Journal.append`] truncates it). Blank lines
    are skipped silently.

    Duplicates: of several valid records with the same `(round, layer, head, stage)` (a record without `stage` is
    stage 0), the **first** in the file is kept and every later one is skipped with a message, whatever its score.

    Args:
        path (`str`): The `journal.jsonl` file (a missing file has no records).
        config_hash, rounds, pool, num_layers, num_heads, num_pairs: What a record must match; see
            [`check_record`].

    Returns:
        `(records, problems)`: records in file order (`score` as a float), messages in file order.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as e:
        return [], [f"{path}: unreadable ({e}); no record read"]
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    first_line: dict[tuple[int, int, int, int], int] = {}
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    offset = 0
    for number, raw in enumerate(lines, start=1):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            reason = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not valid JSON"
            problems.append(f"{where} (byte {start}): {reason} ({raw[:40]!r}); line skipped")
            continue
        problem = check_record(record, config_hash, rounds, pool, num_layers, num_heads, num_pairs)
        if problem:
            problems.append(f"{where}: {problem}; line skipped")
            continue
        key = record_key(record)
        if key in first_line:
            stage = f", stage {key[3]}" if "stage" in record else ""
            problems.append(
                f"{where}: duplicate of line {first_line[key]} (round {key[0]}, head {key[1]}.{key[2]}{stage}); "
                "the first valid record is kept, this one skipped"
            )
            continue
        first_line[key] = number
        records.append({**record, "score": float(record["score"])})
    if tail.strip():
        problems.append(
            f"{path}:{len(lines) + 1} (byte {offset}): torn last line ({len(tail)} bytes without a newline: a write "
            "in progress or cut by a kill); ignored"
        )
    return records, problems


def read_journal(
    path: str | os.PathLike,
    config_hash: str | None = None,
    rounds: int | None = None,
    pool: Container[Head] | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    num_pairs: int | None = None,
) -> list[dict[str, Any]]:
    r"""
    Valid records of a journal file; every skipped line (torn, garbage, invalid, foreign, duplicate) is reported
    with one logger warning. See [`scan_journal`] for the rules (duplicates: the first valid record is kept).

    Args:
        path (`str`): The `journal.jsonl` file.
        config_hash (`str`, *optional*): Only records of this settings hash are valid.
        rounds (`int`, *optional*): Records of round `rounds` or later are invalid.
        pool (`Container[tuple[int, int]]`, *optional*): Records of heads outside it are invalid.
        num_layers, num_heads (`int`, *optional*): The model's size; heads outside it are invalid.
        num_pairs (`int`, *optional*): M; records naming other pairs are invalid.
    """
    records, problems = scan_journal(path, config_hash, rounds, pool, num_layers, num_heads, num_pairs)
    for problem in problems:
        logger.warning(problem)
    return records


def read_run_config(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    r"""
    The `config.json` of a run folder, or `None` when there is none.

    Args:
        output_dir (`str`): The run folder.

    Raises:
        `ValueError`: when the file is not a JSON object with a string `config_hash` (naming the file).
    """
    meta = Path(output_dir) / CONFIG_NAME
    try:
        doc = json.loads(meta.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{meta} is unreadable ({e}); remove it or use another output directory.") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config_hash"), str):
        raise ValueError(
            f"{meta} is not a HeadHunter config (no 'config_hash'); remove it or use another output directory."
        )
    return doc


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


def read_round(
    path: str | os.PathLike, round_index: int | None = None
) -> tuple[dict[Head, float], list[Head], list[Head]] | None:
    r"""
    A round file's `(scores, chosen, selected)`, or `None` (with a logger warning naming the file and the reason)
    when it is missing, unreadable or malformed; see [`parse_round`].

    Args:
        path (`str`): The `rounds/round_{r}.json` file.
        round_index (`int`, *optional*): The round it must describe.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
        return parse_round(doc, round_index)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        logger.warning("%s is invalid (%s); ignored.", path, e)
        return None


# ---------------------------------------------------------------------------------------------------- the journal
class Journal:
    r"""
    `output_dir/journal.jsonl` plus `output_dir/config.json`.

    Writing: each record is one line written with a single `os.write` on a descriptor opened with `O_APPEND`, then
    fsynced, so a run killed at any moment loses at most the candidates in flight. The processes of a run append
    under an exclusive `flock` on the journal; before writing, a torn tail (the file does not end with `"\n"`: a
    writer killed inside its write) is reported with a warning naming the file and the byte offset, and truncated,
    so it is never merged into the next record. `config.json` is written by [`~Journal.start`] (or the first
    append), never by the constructor: a run whose settings fail a check leaves nothing behind.

    Reading: [`~Journal.records`] returns the valid records (see [`scan_journal`]: invalid, foreign, torn and
    duplicate lines are skipped, duplicates keeping the first valid record), warning once per skipped line per
    `Journal`.

    Args:
        output_dir (`str`): The run directory.
        config_hash (`str`): Hash of the settings; a directory holding another hash is refused.
        config (`dict`, *optional*): The settings, written to `config.json` for people and for `--report`.
        rounds (`int`, *optional*): The configured number of rounds (records of a later round are invalid).
        pool (`Container[tuple[int, int]]`, *optional*): The run's candidate heads (records of others are invalid).
        num_layers, num_heads (`int`, *optional*): The model's size (checked, and written to `config.json`).
        num_pairs (`int`, *optional*): M, the run's prompt-seed pairs (records naming others are invalid).
        verbose (`bool`, *optional*, defaults to `True`): Log the skipped lines (off on the non-main processes).

    Raises:
        `ValueError`: when `output_dir/config.json` holds another settings hash or is unreadable.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        config_hash: str,
        config: dict[str, Any] | None = None,
        rounds: int | None = None,
        pool: Container[Head] | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        verbose: bool = True,
        num_pairs: int | None = None,
    ):
        self.dir = Path(output_dir)
        self.path = self.dir / JOURNAL_NAME
        self.config_hash = config_hash
        self.config = config
        self.rounds, self.pool, self.num_layers, self.num_heads = rounds, pool, num_layers, num_heads
        self.num_pairs = num_pairs
        self.verbose = verbose
        self._started = False
        self._reported: set[str] = set()
        self._check_config()

    def _check_config(self) -> bool:
        """Refuse another run's folder; `True` when `config.json` exists."""
        existing = read_run_config(self.dir)
        if existing is None:
            return False
        if existing["config_hash"] != self.config_hash:
            raise ValueError(
                f"{self.dir} holds a search with different settings (config hash {existing['config_hash']} "
                f"!= {self.config_hash}); use another --output-dir or the same settings to resume it."
            )
        return True

    def start(self) -> bool:
        """
        Create the folder and write `config.json` when missing (re-checking the hash of an existing one).

        Returns:
            `bool`: whether `config.json` was written now.
        """
        if self._started:
            return False
        written = False
        if not self._check_config() and self.config is not None:
            meta: dict[str, Any] = {"config_hash": self.config_hash, "config": self.config}
            if self.num_layers is not None and self.num_heads is not None:
                meta.update(num_layers=self.num_layers, num_heads=self.num_heads)
            atomic_write_json(self.dir / CONFIG_NAME, meta)
            written = True
        self.dir.mkdir(parents=True, exist_ok=True)
        self._started = True
        return written

    def append(self, record: dict[str, Any]) -> None:
        """
        Append one record (validated like a read one) as one fsynced line.

        Args:
            record (`dict`): `{"round", "layer", "head", "score", "scores"}` (and optionally `"stage"`, `"pairs"`,
                `"cost"`); `config_hash` is added.

        Raises:
            `ValueError`: when the record would be skipped on reading (e.g. a NaN score, a head outside the pool).
        """
        record = {**record, "config_hash": self.config_hash}
        problem = check_record(
            record, self.config_hash, self.rounds, self.pool, self.num_layers, self.num_heads, self.num_pairs
        )
        if problem:
            raise ValueError(f"Refusing to journal an invalid record ({problem}): {record!r}")
        self.start()
        data = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            size = _cut_torn_tail(fd, self.path)
            written = os.write(fd, data)
            if written != len(data):  # a short write (disk full): take it back, never leave a torn line
                os.ftruncate(fd, size)
                raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes); record not journaled")
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the flock

    def records(self) -> list[dict[str, Any]]:
        """The valid records (see [`scan_journal`]); each skipped line is warned about once per `Journal`."""
        records, problems = scan_journal(
            self.path, self.config_hash, self.rounds, self.pool, self.num_layers, self.num_heads, self.num_pairs
        )
        for problem in problems:
            if problem not in self._reported:
                self._reported.add(problem)
                if self.verbose:
                    logger.warning(problem)
        return records

    def scores(self, round_index: int) -> dict[Head, float]:
        """`{(layer, head): mean score over the pairs journaled}` of the candidates scored in a round."""
        return mean_scores(self.pair_scores(round_index))

    def pair_scores(self, round_index: int, proxy: bool | None = None) -> dict[Head, dict[int, float]]:
        """`{(layer, head): {pair index: score}}` journaled in a round (see [`pair_scores`])."""
        return pair_scores(self.records(), round_index, self.num_pairs, proxy)

    def cost(self, round_index: int | None = None) -> Cost:
        """The work journaled (in one round, or in all)."""
        return journal_cost(self.records(), round_index)


def _cut_torn_tail(fd: int, path: Path) -> int:
    """Truncate an unterminated last line (warning with its byte offset); return the file's size after."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    start, end = 0, size
    while end > 0:  # the byte after the last newline, read backwards in blocks
        block_start = max(0, end - 65536)
        block = os.pread(fd, end - block_start, block_start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            start = block_start + newline + 1
            break
        end = block_start
    logger.warning(
        "%s: torn last line at byte offset %d (%d bytes without a newline, left by a writer killed mid-write); "
        "truncated before appending.",
        path,
        start,
        size - start,
    )
    os.ftruncate(fd, start)
    return start


# ---------------------------------------------------------------------------------------------------- the run lock
class RunDirectoryLocked(ValueError):
    """The run folder is being written by another live run."""


_HELD: dict[str, str] = {}  # resolved lock path -> token, for the locks this process holds
_HELD_GUARD = threading.Lock()


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from `/proc` (Linux), or `None`."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        rest = text[text.rindex(")") + 2 :].split()
        return rest[0], rest[19]
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return True  # cannot tell: assume alive
    stat = _proc_stat(pid)
    if stat is not None:
        if stat[0] in ("Z", "X"):  # a zombie has finished
            return False
        if start_time is not None and stat[1] != start_time:  # the pid was reused by another process
            return False
    return True


class RunLock:
    r"""
    `output_dir/.lock`: one writer per run folder.

    The lock file is created with `os.open(..., O_CREAT | O_EXCL)` and holds JSON with the owner's `pid`,
    `hostname`, process `start_time` (Linux) and a random `token`. A second writer gets a [`RunDirectoryLocked`]
    error naming the folder and the owning pid. A lock is stale, reported with a warning and taken over, when its
    owner ran on this host and is gone: the pid is not alive, is a zombie, belongs to a process started at another
    time (a reused pid), or is this process's own pid without this process holding the lock; an unreadable lock file
    is stale once it is 10 s old. A lock from another host is never taken over (its owner cannot be checked):
    delete the file when that run is gone. [`~RunLock.release`] removes the file only while it still holds this
    lock's token.

    Args:
        output_dir (`str`): The run folder.
    """

    UNREADABLE_GRACE_S = 10.0

    def __init__(self, output_dir: str | os.PathLike):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self.token: str | None = None

    @property
    def _key(self) -> str:
        return str(self.path.resolve())

    def _read(self) -> tuple[bytes | None, dict[str, Any] | None]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError:
            return b"", None
        try:
            info = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return raw, None
        pid = info.get("pid") if isinstance(info, dict) else None
        if not _is_int(pid) or not 0 < pid < 2**31 or not isinstance(info.get("hostname"), str):
            return raw, None
        return raw, info

    def _busy(self, info: dict[str, Any] | None) -> str | None:
        """Why the lock described by `info` is live (a message), or `None` when it is stale."""
        if info is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return None
            if age < self.UNREADABLE_GRACE_S:
                return f"{self.dir} is being locked by another HeadHunter run ({self.path} is being written)"
            return None
        pid, host = info["pid"], info["hostname"]
        owner = f"{self.dir} is in use by another HeadHunter run: pid {pid} on {host} holds {self.path}"
        if host != socket.gethostname():
            return owner + " (another host, cannot check it: delete the lock file if that run is gone)"
        if pid == os.getpid():
            with _HELD_GUARD:
                held = _HELD.get(self._key)
            return owner + " (this process)" if held is not None and held == info.get("token") else None
        start_time = info.get("start_time") if isinstance(info.get("start_time"), str) else None
        return owner if _pid_alive(pid, start_time) else None

    def check(self) -> None:
        """
        Raise when a live run holds the folder (read-only: a stale lock is left for [`~RunLock.acquire`]).

        Raises:
            [`RunDirectoryLocked`]: naming the folder and the owner's pid.
        """
        raw, info = self._read()
        if raw is None:
            return
        busy = self._busy(info)
        if busy:
            raise RunDirectoryLocked(f"{busy}; wait for it to finish or use another --output-dir.")

    def acquire(self) -> RunLock:
        """
        Take the lock (creating the folder), taking over a stale one.

        Raises:
            [`RunDirectoryLocked`]: when a live run holds it, naming the folder and the owner's pid.
        """
        if self.token is not None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        stat = _proc_stat(os.getpid())
        content = {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "start_time": stat[1] if stat else None,
            "token": token,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raw, info = self._read()
                if raw is None:
                    continue  # released meanwhile
                busy = self._busy(info)
                if busy:
                    raise RunDirectoryLocked(f"{busy}; wait for it to finish or use another --output-dir.") from None
                what = f"pid {info['pid']} on {info['hostname']}" if info else "unreadable content"
                logger.warning("%s: taking over a stale lock (%s, no longer running).", self.path, what)
                self._break(raw)
                continue
            try:
                os.write(fd, (json.dumps(content) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            with _HELD_GUARD:
                _HELD[self._key] = token
            self.token = token
            return self
        raise RunDirectoryLocked(f"{self.dir}: could not take {self.path} (other runs keep taking it).")

    def _break(self, raw: bytes) -> None:
        """Remove the stale lock whose content is `raw`, never a lock another run took meanwhile."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_bytes() != raw:  # someone replaced the stale lock first: put theirs back
                try:
                    os.link(aside, self.path)
                except OSError:
                    pass
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if it is still this lock's (a no-op when not held)."""
        if self.token is None:
            return
        with _HELD_GUARD:
            if _HELD.get(self._key) == self.token:
                del _HELD[self._key]
        _, info = self._read()
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        else:
            logger.warning("%s was replaced by another run while this one held it; left in place.", self.path)
        self.token = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def remove_if_empty(folder: Path, names: Iterable[str] = ()) -> None:
    """Remove `names` in `folder`, then `folder` itself when that left it empty (cleanup of a run that failed)."""
    for name in names:
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def ranked_heads(output_dir: str | os.PathLike) -> list[Head]:
    r"""
    The heads of a run in rank order: the full round-1 ranking from the journal (heads scored on more pairs first,
    which only matters for successive halving; then best mean score first, ties by `(layer, head)`), then any
    later-round selection in its selection order (from `selected_heads.json`).

    Args:
        output_dir (`str`): A HeadHunter run folder.

    Raises:
        `ValueError`: when the folder holds no HeadHunter run or its journal no scored round-1 candidate.
    """
    folder = Path(output_dir)
    config = read_run_config(folder)
    if config is None:
        raise ValueError(f"{folder} holds no HeadHunter run (no {CONFIG_NAME}).")
    num_pairs = run_num_pairs(config)
    records = read_journal(folder / JOURNAL_NAME, config["config_hash"], num_pairs=num_pairs)
    # Heads scored on more pairs first (successive halving's survivors before the heads it dropped), then by mean.
    first = pair_scores(records, 0, num_pairs)
    means = mean_scores(first)
    ranking = sorted(means, key=lambda h: (-len(first[h]), -means[h], h))
    if not ranking:
        raise ValueError(f"The journal of {folder} has no scored round-1 candidate yet.")
    try:
        selected = json.loads((folder / "selected_heads.json").read_text()).get("provenance", {}).get("order", [])
    except (OSError, ValueError, AttributeError):
        selected = []
    seen = set(ranking)
    for item in selected:
        head = tuple(item) if isinstance(item, list) and len(item) == 2 else None
        if head is not None and all(_is_int(v) for v in head) and head not in seen:
            ranking.append(head)
            seen.add(head)
    return ranking


def run_num_pairs(meta: dict[str, Any] | None) -> int | None:
    """M of a run's `config.json` content (`None` when its settings do not form a search)."""
    settings = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(settings, dict):
        return None
    try:
        return len(SearchConfig.from_dict(settings).pairs())
    except (TypeError, ValueError):
        return None


def top_k_heads(output_dir: str | os.PathLike, k: int) -> list[Head]:
    """The `k` best heads of a run (see [`ranked_heads`]); refused when `k` exceeds what the run ranked."""
    ranking = ranked_heads(output_dir)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(ranking):
        raise ValueError(f"top_k={k}: the run {output_dir} ranked {len(ranking)} heads; use 1 to {len(ranking)}.")
    return ranking[:k]
