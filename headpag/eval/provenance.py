"""Provenance of a comparison: which implementation, model and weight file each metric used, and the versions."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any

from .._io import file_sha256


LIBRARIES = ("headpag", "torch", "diffusers", "transformers", "open_clip_torch", "pytorch-fid", "scipy", "numpy")


def folder_weights_sha256(folder: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of the weight files of a local model folder (`{}` for a hub id)."""
    path = Path(folder)
    if not path.is_dir():
        return {}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    return {p.name: file_sha256(p) for p in files}


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a metric value depends on."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe(metric: Any) -> dict[str, Any]:
    """A metric's or feature extractor's `provenance` (every headpag metric has one)."""
    return dict(getattr(metric, "provenance", {"implementation": type(metric).__name__}))
