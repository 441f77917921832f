"""
A lock file that keeps a folder to one writer process: created atomically, stale locks (a dead or reused pid on this
host) taken over, never another live owner's. It knows nothing of what the folder holds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from diffusers.utils import logging


logger = logging.get_logger(__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class FolderLocked(ValueError):
    """The folder is being written by another live process."""


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


class FolderLock:
    r"""
    `folder/name`: one writer per folder.

    The lock file is created with `os.open(..., O_CREAT | O_EXCL)` and holds JSON with the owner's `pid`,
    `hostname`, process `start_time` (Linux) and a random `token`. A second writer gets a [`FolderLocked`] error
    naming the folder and the owning pid. A lock is stale, reported with a warning and taken over, when its owner ran
    on this host and is gone: the pid is not alive, is a zombie, belongs to a process started at another time (a
    reused pid), or is this process's own pid without this process holding the lock; an unreadable lock file is
    stale once it is 10 s old. A lock from another host is never taken over (its owner cannot be checked): delete the
    file when that process is gone. [`~FolderLock.release`] removes the file only while it still holds this lock's
    token.

    Args:
        folder (`str`): The folder to keep to one writer.
        name (`str`, defaults to `".lock"`): The lock file's name in it.
        owner (`str`, defaults to `"process"`): What holds such locks, for messages ("another {owner}").
        hint (`str`, defaults to `"wait for it to finish"`): What to do about a live lock, for messages.
    """

    UNREADABLE_GRACE_S = 10.0

    def __init__(
        self,
        folder: str | os.PathLike,
        name: str = ".lock",
        owner: str = "process",
        hint: str = "wait for it to finish",
    ):
        self.dir = Path(folder)
        self.path = self.dir / name
        self.owner, self.hint = owner, hint
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
                return f"{self.dir} is being locked by another {self.owner} ({self.path} is being written)"
            return None
        pid, host = info["pid"], info["hostname"]
        owner = f"{self.dir} is in use by another {self.owner}: pid {pid} on {host} holds {self.path}"
        if host != socket.gethostname():
            return owner + " (another host, cannot check it: delete the lock file if that process is gone)"
        if pid == os.getpid():
            with _HELD_GUARD:
                held = _HELD.get(self._key)
            return owner + " (this process)" if held is not None and held == info.get("token") else None
        start_time = info.get("start_time") if isinstance(info.get("start_time"), str) else None
        return owner if _pid_alive(pid, start_time) else None

    def check(self) -> None:
        """
        Raise when a live owner holds the folder (read-only: a stale lock is left for [`~FolderLock.acquire`]).

        Raises:
            [`FolderLocked`]: naming the folder and the owner's pid.
        """
        raw, info = self._read()
        if raw is None:
            return
        busy = self._busy(info)
        if busy:
            raise FolderLocked(f"{busy}; {self.hint}.")

    def acquire(self) -> FolderLock:
        """
        Take the lock (creating the folder), taking over a stale one.

        Raises:
            [`FolderLocked`]: when a live owner holds it, naming the folder and the owner's pid.
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
                    raise FolderLocked(f"{busy}; {self.hint}.") from None
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
        raise FolderLocked(f"{self.dir}: could not take {self.path} (others keep taking it).")

    def _break(self, raw: bytes) -> None:
        """Remove the stale lock whose content is `raw`, never a lock another process took meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
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
            logger.warning("%s was replaced by another process while this one held it; left in place.", self.path)
        self.token = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
