"""
The search journal: one JSON line per finished candidate and stage (see [`~search.records`]), appended and fsynced as
soon as its scores are known, and read back through a validating reader. The run directory that holds it is
[`~search.rundir.RunDirectory`]'s.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Container
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusers.utils import logging

from .cost import Cost
from .records import Head, check_record, journal_cost, mean_scores, pair_scores, record_key


if TYPE_CHECKING:
    from .rundir import RunDirectory

try:  # advisory locks serialize the appends of the processes of one run (not on Windows)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


logger = logging.get_logger(__name__)


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


class Journal:
    r"""
    A run directory's journal (`journal.jsonl`) and the settings it was made with (`config.json`).

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
        run ([`~search.rundir.RunDirectory`] or `str`): The run directory.
        config_hash (`str`): Hash of the settings; a directory holding another hash is refused.
        config (`dict`, *optional*): The settings, written to `config.json` for people and for `--report`.
        rounds (`int`, *optional*): The configured number of rounds (records of a later round are invalid).
        pool (`Container[tuple[int, int]]`, *optional*): The run's candidate heads (records of others are invalid).
        num_layers, num_heads (`int`, *optional*): The model's size (checked, and written to `config.json`).
        num_pairs (`int`, *optional*): M, the run's prompt-seed pairs (records naming others are invalid).
        verbose (`bool`, *optional*, defaults to `True`): Log the skipped lines (off on the non-main processes).

    Raises:
        `ValueError`: when the run's `config.json` holds another settings hash or is unreadable.
    """

    def __init__(
        self,
        run: RunDirectory | str | os.PathLike,
        config_hash: str,
        config: dict[str, Any] | None = None,
        rounds: int | None = None,
        pool: Container[Head] | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        verbose: bool = True,
        num_pairs: int | None = None,
    ):
        from .rundir import RunDirectory

        self.run = run if isinstance(run, RunDirectory) else RunDirectory(run)
        self.dir = self.run.path
        self.path = self.run.journal_path
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
        existing = self.run.read_config()
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
            self.run.write_config(meta)
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
        nofollow = getattr(os, "O_NOFOLLOW", 0)  # a link planted at the journal's name is not followed
        fd = os.open(self.run.confined(self.path), os.O_RDWR | os.O_APPEND | os.O_CREAT | nofollow, 0o644)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # a hard link or a device planted at its name
                raise ValueError(f"{self.path.name} of {self.dir.name!r} is not a plain file of its own; not written.")
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
