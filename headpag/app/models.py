"""
What a client may ask the server to load, by name: pipelines (hub ids, the offline models `headpag-shapes`,
`headpag-shapes-flux` and the tiny ones, folders of the models root) and metric weights (open_clip names, hub ids,
files and folders of the models root). Nothing else is loadable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..models.catalog import offline_models
from .roots import Roots, check_name, is_hub_id


@dataclass(frozen=True)
class ModelChoice:
    r"""
    A pipeline a client named.

    Args:
        target (`str`): What `load_pipeline` gets (a tiny name, a hub id, or the resolved folder).
        name (`str`): What clients see and what is recorded (the client's name, never a server path).
        local (`bool`): Whether it is a folder of the models root.
    """

    target: str
    name: str
    local: bool = False


def _not_local_path(name: str, what: str) -> None:
    # `from_pretrained("a/b")` loads a folder `a/b` relative to the server's working directory when there is one.
    if os.path.lexists(name):
        raise ValueError(
            f"{what} {name!r} is refused: it also names a path on the server. Put local models in the models folder "
            "and load them by folder name."
        )


def resolve_pipeline(name: object, roots: Roots) -> ModelChoice:
    r"""
    The pipeline a client may load under `name`: a tiny model, a hub id (`owner/name`), or a folder of the models
    root named by its folder name.

    Raises:
        `ValueError`: for anything else (a path, `..`, a folder outside the models root, a folder that is not a
        diffusers pipeline), without quoting any file.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"Give a model: a hub id (owner/name), a models-folder name, or {', '.join(offline_models())}."
        )
    name = name.strip()
    if name in offline_models():
        return ModelChoice(name, name)
    if is_hub_id(name):
        _not_local_path(name, "Hub id")
        return ModelChoice(name, name)
    if "/" in name or "\\" in name:
        raise ValueError(
            "Invalid model: give a hub id (owner/name), the name of a folder in the server's models folder, or one "
            f"of {', '.join(offline_models())}; paths are not accepted."
        )
    check_name(name, "model folder name")
    folder = roots.path("models", name, "model folder", folder=True)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"Model folder {name!r} is not a diffusers pipeline folder (it has no model_index.json).")
    roots.check_tree("models", folder, f"model folder {name!r}")
    return ModelChoice(str(folder), name, local=True)


def pipeline_folders(roots: Roots) -> list[str]:
    """Folders of the models root that hold a diffusers pipeline (`model_index.json`)."""
    return roots.names("models", folder=True, predicate=lambda p: (p / "model_index.json").is_file())


def weights_file(name: object, roots: Roots, what: str) -> str | None:
    """A file of the models root named by its file name (`""`/`None`: none)."""
    if name in (None, ""):
        return None
    return str(roots.path("models", name, what, folder=False))


def clip_model(name: object, roots: Roots) -> str:
    r"""
    An open_clip model: a registered name (`ViT-L-14`), or a model config `.json` file of the models root.

    Raises:
        `ValueError`: for an unknown name, a path, or a missing file.
    """
    if name in (None, ""):
        return "ViT-L-14"
    check_name(name, "CLIP model")
    if name.endswith(".json"):
        return str(roots.path("models", name, "CLIP config file", folder=False))
    import open_clip

    known = open_clip.list_models()
    if name not in known:
        raise ValueError(
            f"Unknown CLIP model {name!r}: use an open_clip model name (e.g. ViT-L-14, ViT-B-32) or the name of a "
            "model config .json file in the server's models folder."
        )
    return name


def hub_or_folder(name: object, roots: Roots, what: str) -> str | None:
    """A hub id (`owner/name`) or a folder of the models root named by its folder name (`""`/`None`: none)."""
    if name in (None, ""):
        return None
    if is_hub_id(name):
        _not_local_path(name, "Hub id")
        return name
    return str(roots.path("models", name, what, folder=True))
