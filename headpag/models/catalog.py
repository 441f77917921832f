"""
Models and metrics that load by name, registered through entry points so that a package (this one's testbed, or a
third party's) adds names without the loaders knowing it:

- `headpag.models`: a name -> a mapping `{"folder": Path, "missing": str}` (a diffusers folder, whose
  `headpag_config.json` may recommend sampler settings, see [`model_defaults`]; what to do when it is absent);
- `headpag.pair_metrics`: a name -> a per-image metric class (`Class(device=None)`, `score(images, prompts)`);
- `headpag.features`: a name -> a feature model class for FID / KID / PRDC (`Class(device=None)(images)`).

The tiny random-weight models (`tiny-sd3`, `tiny-sd35`, `tiny-flux`) are built in memory by [`~models.tiny`].
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ..pipelines.model_config import read_headpag_config
from .tiny import TINY_MODELS


GROUPS = ("headpag.models", "headpag.pair_metrics", "headpag.features")
DEFAULT_MODEL = "headpag-shapes"


@functools.cache
def _entries(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in sorted(entry_points(group=group), key=lambda ep: ep.name)}


def registered(group: str) -> list[str]:
    """The names registered in an entry-point group (see the module docstring)."""
    if group not in GROUPS:
        raise ValueError(f"Unknown registry {group!r}; allowed: {', '.join(GROUPS)}.")
    return list(_entries(group))


def load_registered(group: str, name: str, what: str) -> Any:
    """The object registered as `name` in `group`; a `ValueError` naming the registered ones otherwise."""
    entries = _entries(group)
    if name not in entries:
        allowed = ", ".join(entries) or "none registered"
        raise ValueError(f"Unknown {what} {name!r}; allowed: {allowed}.")
    return entries[name].load()


def builtin_models() -> list[str]:
    """Models registered by name (`headpag.models` entry points), e.g. `headpag-shapes`."""
    return registered("headpag.models")


def offline_models() -> list[str]:
    """Every model that loads by name without a download: the registered ones and the tiny random-weight ones."""
    return [*builtin_models(), *TINY_MODELS]


def model_defaults(name: str | None) -> dict[str, Any]:
    """
    The sampler settings a model recommends to the CLI and the UI (`steps`, `size`, `guidance`, FLUX's `true_cfg`,
    `prompt`, and `note`, a line the UI shows under the prompt): the `"sampler"` section of the `headpag_config.json`
    in its folder (a registered model's, or a local folder's), next to the PAG defaults that pipeline calls read (`{}`
    for a hub id or a folder without one). Pipeline calls never read it.
    """
    if name in _entries("headpag.models"):
        folder = load_registered("headpag.models", name, "model")["folder"]
    elif name and Path(name).is_dir():
        folder = name
    else:
        return {}
    sampler = read_headpag_config(folder).get("sampler")
    return dict(sampler) if isinstance(sampler, dict) else {}


def builtin_folder(name: str) -> Path:
    """The folder of a registered model; `FileNotFoundError` (naming it and how to make it) when it is missing."""
    entry = load_registered("headpag.models", name, "model")
    folder = Path(entry["folder"])
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The built-in model {name!r} is not installed ({folder} has no model_index.json). Reinstall headpag"
            + (f", or {entry['missing']}." if entry.get("missing") else ".")
        )
    return folder
