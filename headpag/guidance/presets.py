"""Ready-made head sets: the heads that the HeadHunter paper (arXiv 2506.10978) names with their effects.

Each preset is a head-set JSON file in `headpag/presets/` (the [`HeadSet.save`] format), shipped as package data and
read with `importlib.resources`. Only heads whose effect the paper's figures state unambiguously are included; they
were copied from the figures, not searched or re-measured here, and hold for the model they were found on
(SD3-medium: 24 layers x 24 heads; FLUX.1-dev: 57 x 24), which [`load_preset`] checks.

```py
>>> from headpag.guidance.presets import list_presets, load_preset
>>> [p.name for p in list_presets(family="flux")][:2]
['flux-cool-tone', 'flux-glossy-plastic']
>>> load_preset("sd3-darker-lighting", num_layers=24, num_heads=24, family="sd3")
HeadSet('1.10')
```
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from .heads import HeadSet


PRESET_PACKAGE = "headpag"
PRESET_FOLDER = "presets"
FAMILY_MODELS = {"sd3": "SD3", "flux": "FLUX.1"}


@dataclass(frozen=True)
class PresetInfo:
    r"""
    What a preset is, for listings (CLI `--help`, UI dropdowns). Fields read as attributes or as items
    (`info.name == info["name"]`).

    Args:
        name (`str`): Kebab-case name to pass to [`load_preset`], e.g. `"flux-golden-hour"`.
        family (`str`): Model family it was found on: `"sd3"` or `"flux"`.
        description (`str`): The effect of perturbing these heads, as the paper names it.
        source (`str`): Where it comes from, e.g. `"HeadHunter paper (arXiv:2506.10978), Fig. 3"`.
        num_layers (`int`): Layers of the model it was found on.
        num_heads (`int`): Heads per layer of that model.
        spec (`str`): The heads as a spec string, e.g. `"38.18"`.
        model_name (`str`, *optional*): Hub id of that model.
    """

    name: str
    family: str
    description: str
    source: str
    num_layers: int
    num_heads: int
    spec: str
    model_name: str | None = None

    def __getitem__(self, key: str) -> Any:
        """`info["name"]` works like `info.name` (listings can be used as dicts)."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serialisable)."""
        return asdict(self)

    @property
    def shape(self) -> str:
        """`"24 layers x 24 heads"`."""
        return f"{self.num_layers} layers x {self.num_heads} heads"


@lru_cache(maxsize=1)
def _catalog() -> dict[str, tuple[PresetInfo, HeadSet]]:
    folder = resources.files(PRESET_PACKAGE).joinpath(PRESET_FOLDER)
    out: dict[str, tuple[PresetInfo, HeadSet]] = {}
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    for file in files:
        name = file.name[: -len(".json")]
        source = f"preset {name!r} ({PRESET_PACKAGE}/{PRESET_FOLDER}/{file.name})"
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"Malformed head-set file {source}: {e}") from None
        heads = HeadSet.from_json_dict(doc, source=source)
        meta = heads.metadata
        missing = [
            k for k in ("model_family", "num_layers", "num_heads", "description", "provenance") if k not in meta
        ]
        if missing:
            raise ValueError(f"Malformed head-set file {source}: a preset needs {missing}.")
        provenance = meta["provenance"]
        info = PresetInfo(
            name=name,
            family=str(meta["model_family"]),
            description=meta["description"],
            source=str(provenance.get("source", "")) if isinstance(provenance, dict) else str(provenance),
            num_layers=meta["num_layers"],
            num_heads=meta["num_heads"],
            spec=str(heads),
            model_name=meta.get("model_name"),
        )
        out[name] = (info, heads)
    return out


def preset_names() -> list[str]:
    """The names of every shipped preset, sorted."""
    return list(_catalog())


def list_presets(family: str | None = None) -> list[PresetInfo]:
    """
    Describe the shipped presets, sorted by name.

    Args:
        family (`str`, *optional*): Only the presets of this model family (`"sd3"` or `"flux"`).

    Returns:
        `list[PresetInfo]`: name, family, description, source, model shape and spec of each preset.
    """
    infos = [info for info, _ in _catalog().values()]
    if family is None:
        return infos
    return [info for info in infos if info.family == family.strip().lower()]


def preset_info(name: str) -> PresetInfo:
    """The [`PresetInfo`] of one preset (`ValueError` listing the known names when it does not exist)."""
    return _lookup(name)[0]


def _lookup(name: str) -> tuple[PresetInfo, HeadSet]:
    catalog = _catalog()
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in catalog:
        raise ValueError(f"Unknown head-set preset {name!r}; known presets: {', '.join(catalog)}.")
    return catalog[key]


def load_preset(
    name: str, num_layers: int | None = None, num_heads: int | None = None, family: str | None = None
) -> HeadSet:
    """
    Load a shipped preset, refusing a model it was not found on.

    Args:
        name (`str`): A name from [`list_presets`], e.g. `"sd3-darker-lighting"` or `"flux-golden-hour"`.
        num_layers (`int`, *optional*): Layers of the model it will be used on; must equal the preset's.
        num_heads (`int`, *optional*): Heads per layer of that model; must equal the preset's.
        family (`str`, *optional*): Family of that model (`"sd3"` or `"flux"`); must equal the preset's.

    Returns:
        `HeadSet`: explicit heads, with the file's metadata (`model_family`, `num_layers`, `num_heads`,
        `description`, `provenance`, ...).

    Raises:
        `ValueError`: for an unknown name (listing the known ones), or a model of another family or shape (naming
            the preset's and the model's).
    """
    info, heads = _lookup(name)
    found_on = f"{FAMILY_MODELS.get(info.family, info.family)} ({info.family!r}, {info.shape})"
    if family is not None and family.strip().lower() != info.family:
        raise ValueError(
            f"Head-set preset {info.name!r} was found on {found_on}; it does not apply to a model of family "
            f"{family!r}. Presets for that family: {', '.join(p.name for p in list_presets(family)) or 'none'}."
        )
    if (num_layers is not None and num_layers != info.num_layers) or (
        num_heads is not None and num_heads != info.num_heads
    ):
        layers_text, heads_text = ("?" if n is None else n for n in (num_layers, num_heads))
        model = f"{layers_text} layers x {heads_text} heads"
        raise ValueError(
            f"Head-set preset {info.name!r} was found on {found_on}, but this model has {model}; its heads "
            "would not mean the same thing here."
        )
    return heads
