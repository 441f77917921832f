"""
The output folder's disk use: every file the server writes there (generated PNGs, saved head sets) is charged to the
client that asked for it, within a quota per client and one in total, and old files are cleaned up (by age, then by
count). Everything is checked before the work that would write.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from diffusers.utils import logging

from ..options import Limits


logger = logging.get_logger(__name__)

MB = 1 << 20


class OutputStore:
    r"""
    Quotas and cleanup of the output folder.

    Args:
        folder (`Path`): The output folder (its top-level files are counted; hidden files are skipped).
        limits ([`Limits`]): `max_output_mb_per_client`, `max_output_mb`, `max_output_age_h`, `max_output_files`.
        clock (`Callable[[], float]`, defaults to `time.time`): For file ages (compared with modification times).
    """

    def __init__(self, folder: str | Path, limits: Limits, clock: Callable[[], float] = time.time):
        self.folder, self.limits, self.clock = Path(folder), limits, clock
        self._owners: dict[str, str] = {}  # file name -> client
        self._pending: dict[str, int] = {}  # client -> bytes reserved by requests still at work
        self._lock = threading.Lock()

    def _files(self) -> list[tuple[Path, float, int]]:
        out = []
        if not self.folder.is_dir():
            return out
        for path in self.folder.iterdir():
            try:
                if path.name.startswith(".") or not path.is_file() or path.is_symlink():
                    continue
                stat = path.stat()
            except OSError:
                continue
            out.append((path, stat.st_mtime, stat.st_size))
        return sorted(out, key=lambda item: item[1])

    def cleanup(self) -> list[Path]:
        """Delete files older than `max_output_age_h`, then the oldest beyond `max_output_files`; the deleted."""
        with self._lock:
            return self._cleanup()[0]

    def _cleanup(self) -> tuple[list[Path], list[tuple[Path, float, int]]]:
        """`(the files removed, the files kept)`."""
        files = self._files()
        oldest_kept = self.clock() - self.limits.max_output_age_h * 3600
        removed = [path for path, mtime, _ in files if mtime < oldest_kept]
        kept = [f for f in files if f[1] >= oldest_kept]
        # Beyond the file count, the oldest files of whoever holds the most go first (one client's many small saves
        # cannot push out everyone else's images).
        by_owner: dict[str | None, list[Path]] = {}
        for path, _, _ in kept:  # oldest first
            by_owner.setdefault(self._owners.get(path.name), []).append(path)
        for _ in range(len(kept) - self.limits.max_output_files):
            holder = max(by_owner, key=lambda owner: len(by_owner[owner]))
            removed.append(by_owner[holder].pop(0))
        for path in removed:
            path.unlink(missing_ok=True)
            self._owners.pop(path.name, None)
        if removed:
            logger.info("output folder cleanup: %d file(s) removed", len(removed))
        gone = set(removed)
        return removed, [f for f in kept if f[0] not in gone]

    def usage(self, client: str | None = None) -> int:
        """Bytes in the folder, and reserved by requests at work (`client`'s only, when given)."""
        return self._usage(self._files(), client)

    def _usage(self, files: list[tuple[Path, float, int]], client: str | None) -> int:
        stored = sum(size for path, _, size in files if client is None or self._owners.get(path.name) == client)
        pending = sum(self._pending.values()) if client is None else self._pending.get(client, 0)
        return stored + pending

    @contextlib.contextmanager
    def reserve(self, client: str, nbytes: int) -> Iterator[Callable[[str | Path], None]]:
        r"""
        Clean up, then hold `nbytes` for `client` while the block runs, refusing (before any work) a request that would
        take `client` past `max_output_mb_per_client` or the folder past `max_output_mb`. The block receives a
        function to call with each file it writes: written files are charged to `client` even when the block fails.

        Raises:
            `ValueError`: naming the quota, the usage and the flag that raises it.
        """
        with self._lock:
            _, files = self._cleanup()  # one listing of the folder for both quotas
            for what, used, name in (
                ("your files in the output folder", self._usage(files, client), "max_output_mb_per_client"),
                ("the output folder", self._usage(files, None), "max_output_mb"),
            ):
                quota = getattr(self.limits, name) * MB
                if used + nbytes > quota:
                    raise ValueError(
                        f"Disk quota: {what} take {used / MB:.1f} MB; this request needs up to {nbytes / MB:.1f} MB "
                        f"more and the limit {name}={getattr(self.limits, name):g} MB would be passed. Files older "
                        f"than {self.limits.max_output_age_h:g} h are removed; the server's operator can raise the "
                        f"limit with {Limits.flag(name)}."
                    )
            self._pending[client] = self._pending.get(client, 0) + nbytes
        try:
            yield lambda path: self.record(client, [path])
        finally:
            with self._lock:
                self._pending[client] -= nbytes
                if self._pending[client] <= 0:
                    del self._pending[client]

    def record(self, client: str, paths: Iterable[str | Path]) -> None:
        """Charge written files to `client`."""
        with self._lock:
            for path in paths:
                self._owners[Path(path).name] = client


def png_bound(width: int, height: int, count: int = 1) -> int:
    """An upper bound of `count` RGB PNGs of `width` x `height` with their metadata (stored, never more than raw)."""
    return count * (width * height * 3 + height + 64 * 1024)
