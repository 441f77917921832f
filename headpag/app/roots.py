"""
The folders the web UI may read or write, fixed at start-up, and the names clients use for what lies in them.

Clients never pass a filesystem path: they name a run, a folder or a file *inside* one of the roots. A name is
refused unless it matches [`NAME_PATTERN`] (no separator, no `..`, no absolute path, nothing to decode), and every
path built from one has its symlinks resolved and is checked again to lie inside its root.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from diffusers.utils import logging


logger = logging.get_logger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
ROOT_KINDS = ("output", "search", "models", "eval")
ROOT_FLAGS = {"output": "--output-dir", "search": "--search-dir", "models": "--models-dir", "eval": "--eval-dir"}
DEFAULT_WORKDIR = "headpag-ui"
MAX_TREE_ENTRIES = 20_000  # a run folder with more entries than this is refused rather than walked


def check_name(name: object, what: str = "name") -> str:
    r"""
    A client-given name of something inside a root, or a `ValueError` that says what a name may be.

    Args:
        name (`str`): The name (nothing is decoded or normalised: `%2e%2e`, `..`, `a/b` and `/x` are refused).
        what (`str`): What the name names, for the message (e.g. `"search run"`).
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        shown = repr(name) if isinstance(name, str) and len(name) <= 80 else f"a {type(name).__name__}"
        raise ValueError(
            f"Invalid {what} {shown}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(a name inside the server's folders, never a path)."
        )
    return name


def is_hub_id(name: object) -> bool:
    """Whether `name` has the form of a Hugging Face Hub id, `owner/name` (no `..` segment)."""
    return isinstance(name, str) and bool(HUB_ID_PATTERN.fullmatch(name)) and ".." not in name.split("/")


def inside(path: Path, root: Path) -> bool:
    """Whether the resolved `path` is `root` or lies under it (both already resolved)."""
    return path == root or root in path.parents


@dataclass(frozen=True)
class Roots:
    r"""
    The four folders of the UI, resolved once at start-up.

    Args:
        output (`Path`): Generated PNGs and saved head sets; the only folder served to clients.
        search (`Path`): HeadHunter runs, one folder per run name.
        models (`Path`): Loadable model folders and metric weights (CLIP configs and checkpoints, PickScore
            folders, Inception weights), named by their folder or file name.
        eval (`Path`): Image folders to score and `headpag eval` run folders, named by folder name.
    """

    output: Path
    search: Path
    models: Path
    eval: Path

    @classmethod
    def create(
        cls,
        workdir: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        search_dir: str | os.PathLike | None = None,
        models_dir: str | os.PathLike | None = None,
        eval_dir: str | os.PathLike | None = None,
    ) -> Roots:
        r"""
        Create (when missing) and resolve the roots; each defaults to a sub-folder of `workdir`.

        Args:
            workdir (`str`, *optional*): Parent of the default roots (default `./headpag-ui`).
            output_dir, search_dir, models_dir, eval_dir (`str`, *optional*): Explicit roots.

        Raises:
            `ValueError`: when the served output root contains another root or lies inside one.
        """
        base = Path(workdir or DEFAULT_WORKDIR)
        given = {"output": output_dir, "search": search_dir, "models": models_dir, "eval": eval_dir}
        paths = {}
        for kind in ROOT_KINDS:
            path = Path(given[kind]) if given[kind] else base / kind
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(
                    f"{ROOT_FLAGS[kind]} {path}: cannot create the folder ({type(e).__name__})."
                ) from None
            if not path.is_dir():
                raise ValueError(f"{ROOT_FLAGS[kind]} {path} is not a folder.")
            paths[kind] = path.resolve()
        served = paths["output"]
        for kind in ROOT_KINDS[1:]:
            other = paths[kind]
            if inside(other, served) or inside(served, other):
                raise ValueError(
                    f"--output-dir {served} is served to clients, so it must neither contain nor lie inside "
                    f"{ROOT_FLAGS[kind]} {other}; give them separate folders."
                )
        return cls(**paths)

    def root(self, kind: str) -> Path:
        if kind not in ROOT_KINDS:
            raise ValueError(f"Unknown root {kind!r}; allowed: {', '.join(ROOT_KINDS)}.")
        return getattr(self, kind)

    def contain(self, kind: str, path: str | os.PathLike, what: str = "path") -> Path:
        """`path` with its symlinks resolved, or a `ValueError` when it leads outside root `kind`."""
        resolved = Path(path).resolve()
        if not inside(resolved, self.root(kind)):
            raise ValueError(f"The {what} leads outside the server's {kind} folder; refused.")
        return resolved

    def path(self, kind: str, name: object, what: str, must_exist: bool = True, folder: bool | None = None) -> Path:
        r"""
        The resolved path of `name` inside root `kind`.

        Args:
            kind (`str`): `"output"`, `"search"`, `"models"` or `"eval"`.
            name (`str`): A client-given name (see [`check_name`]).
            what (`str`): What it names, for messages (`"search run"`, `"image folder"`, ...).
            must_exist (`bool`): Refuse a name that names nothing (the message lists existing names).
            folder (`bool`, *optional*): Require a folder (`True`) or a file (`False`).

        Raises:
            `ValueError`: an invalid name, a symlink leading outside the root, or a missing or wrong kind of entry.
        """
        name = check_name(name, what)
        root = self.root(kind)
        resolved = self.contain(kind, root / name, f"{what} {name!r}")
        if must_exist and not resolved.exists():
            known = self.names(kind, folder=folder)
            hint = f" Existing: {', '.join(known[:20])}{', ...' if len(known) > 20 else ''}." if known else ""
            raise ValueError(f"No {what} named {name!r} on this server.{hint}")
        if resolved.exists() and folder is not None and resolved.is_dir() != folder:
            raise ValueError(f"{what.capitalize()} {name!r} is not a {'folder' if folder else 'file'}.")
        return resolved

    def names(self, kind: str, folder: bool | None = None, predicate=None) -> list[str]:
        r"""
        Sorted names of the entries of root `kind` that a client may name.

        Args:
            kind (`str`): The root.
            folder (`bool`, *optional*): Only folders (`True`) or only files (`False`).
            predicate (`Callable[[Path], bool]`, *optional*): Keep only entries (resolved paths) for which it holds.
        """
        root = self.root(kind)
        out = []
        try:
            entries = sorted(root.iterdir())
        except OSError:
            return []
        for entry in entries[:MAX_TREE_ENTRIES]:
            if not NAME_PATTERN.fullmatch(entry.name):
                continue
            try:
                resolved = self.contain(kind, entry)
                if folder is not None and resolved.is_dir() != folder:
                    continue
                if predicate is not None and not predicate(resolved):
                    continue
            except (ValueError, OSError):
                continue
            out.append(entry.name)
        return out

    def check_tree(self, kind: str, folder: Path, what: str) -> None:
        r"""
        Refuse a folder with a symlink (at any depth) that leads outside root `kind`, before reading or writing it.

        Args:
            kind (`str`): The root the folder lies in.
            folder (`Path`): The (resolved) folder.
            what (`str`): What it is, for the message.
        """
        if not folder.is_dir():
            return
        count = 0
        for current, dirs, files in os.walk(folder, followlinks=False):
            for entry in (*dirs, *files):
                count += 1
                if count > MAX_TREE_ENTRIES:
                    raise ValueError(f"The {what} holds more than {MAX_TREE_ENTRIES} entries; refused.")
                path = Path(current) / entry
                if path.is_symlink():
                    self.contain(kind, path, f"{what} (one of its links)")

    def redact(self, text: str) -> str:
        """`text` with the roots' server paths replaced by `<kind>` (for messages shown to clients)."""
        for kind in ROOT_KINDS:
            text = text.replace(str(self.root(kind)), f"<{kind}>")
        return text
