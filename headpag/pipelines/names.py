"""
Models that load by name, offline: the trained shapes testbed shipped in the package, and the tiny random-weight
models built in memory. Names map to package folders as data; nothing here imports `headpag.testbed`.
"""

from __future__ import annotations

from pathlib import Path

from .tiny import TINY_MODELS


_PACKAGE = Path(__file__).resolve().parent.parent
# name -> diffusers folder, relative to the `headpag` package
BUILTIN_MODELS = {"headpag-shapes": "testbed/weights/shapes-sd3"}
DEFAULT_MODEL = "headpag-shapes"
# what the UI starts with for a built-in model (it was trained at 64x64; CFG measured in docs/testbed-results.md)
MODEL_DEFAULTS = {
    "headpag-shapes": {
        "steps": 20,
        "size": 64,
        "guidance": 5.0,
        "prompt": "a large white triangle on a green background at the top right",
    }
}
OFFLINE_MODELS = (*BUILTIN_MODELS, *TINY_MODELS)


def builtin_folder(name: str) -> Path:
    """The folder of a built-in model; `FileNotFoundError` (naming it and how to make it) when it is missing."""
    folder = _PACKAGE / BUILTIN_MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The built-in model {name!r} is not installed ({folder} has no model_index.json). Reinstall headpag, or "
            "train it with `python -m headpag.testbed.train`."
        )
    return folder
