from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest

from headpag import HeadSet
from headpag.guidance.presets import PresetInfo, list_presets, load_preset, preset_info, preset_names


SHAPES = {"sd3": (24, 24), "flux": (57, 24)}
# The heads the paper names with their effects (paper-notes.md: Fig. 3, Fig. 36, Figs. 33/35).
EXPECTED = {
    "sd3-darker-lighting": "1.10",
    "sd3-diagonal-shear": "11.15",
    "sd3-shadow": "13.17",
    "sd3-blue": "0.23",
    "sd3-white": "0.15, 1.19",
    "sd3-dark": "1.2, 1.10",
    "flux-golden-hour": "38.18",
    "flux-green-filter": "52.12",
    "flux-glossy-plastic": "43.17",
    "flux-vintage-film": "51.23",
    "flux-warm-red": "52.22",
    "flux-smooth-bokeh": "34.0",
    "flux-cool-tone": "52.6",
}
PRESET_FILES = sorted(p for p in resources.files("headpag").joinpath("presets").iterdir() if p.name.endswith(".json"))


def test_every_shipped_file_is_listed():
    assert sorted(p.name[: -len(".json")] for p in PRESET_FILES) == preset_names() == sorted(EXPECTED)


@pytest.mark.parametrize("file", PRESET_FILES, ids=lambda p: p.name)
def test_shipped_file_loads_and_fits_its_model(file):
    doc = json.loads(file.read_text(encoding="utf-8"))
    heads = HeadSet.from_json_dict(doc, source=file.name)  # also checks the heads against num_layers x num_heads
    meta = heads.metadata
    name = file.name[: -len(".json")]
    assert name.startswith(f"{meta['model_family']}-") and name == name.lower() and " " not in name
    assert (meta["num_layers"], meta["num_heads"]) == SHAPES[meta["model_family"]]
    assert heads.is_resolved and heads.check(meta["num_layers"], meta["num_heads"]) == heads
    assert heads == HeadSet.parse(EXPECTED[name]) and doc["spec"] == str(heads)
    assert meta["description"].strip()
    provenance = meta["provenance"]
    assert provenance["paper"] == "arXiv:2506.10978" and provenance["searched_here"] is False
    assert "Fig" in provenance["source"] and provenance["figure"] in {"3", "36", "33/35"}
    if meta["model_family"] == "flux":
        assert all(layer >= 19 for layer in heads.layers())  # single-stream blocks, as the paper says
    # Same document as HeadSet.save writes.
    assert doc == heads.to_json_dict()
    assert load_preset(name, *SHAPES[meta["model_family"]], family=meta["model_family"]) == heads


def test_listing():
    presets = list_presets()
    assert [p.name for p in presets] == sorted(EXPECTED)
    assert all(isinstance(p, PresetInfo) for p in presets)
    golden = preset_info("flux-golden-hour")
    assert golden.family == "flux" and golden.spec == "38.18" and (golden.num_layers, golden.num_heads) == (57, 24)
    assert "Golden" in golden.description and "Figs. 33 and 35" in golden.source
    assert golden.model_name == "black-forest-labs/FLUX.1-dev"
    assert set(golden.to_dict()) >= {"name", "family", "description", "source"}
    assert golden["name"] == golden.name and golden["source"] == golden.source
    with pytest.raises(KeyError):
        golden["nope"]
    shear = preset_info("sd3-diagonal-shear")
    assert shear.family == "sd3" and "Fig. 3" in shear.source
    assert {p.family for p in list_presets(family="sd3")} == {"sd3"}
    assert [p.name for p in list_presets(family="FLUX")] == sorted(n for n in EXPECTED if n.startswith("flux-"))
    assert list_presets(family="other") == []


def test_load_without_a_model_and_metadata():
    heads = load_preset("sd3-darker-lighting")
    assert heads == HeadSet([(1, 10)]) and heads.metadata["model_family"] == "sd3"
    assert load_preset(" SD3-Dark ") == HeadSet.parse("1.2, 1.10")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"Unknown head-set preset 'sd3-sparkle'; known presets: flux-.*sd3-darker-lighting"
    ) as e:
        load_preset("sd3-sparkle")
    assert all(name in str(e.value) for name in EXPECTED)
    with pytest.raises(ValueError, match="Unknown head-set preset"):
        preset_info("nope")


def test_wrong_family():
    with pytest.raises(ValueError, match=r"'flux-golden-hour' was found on FLUX\.1.*57 layers x 24 heads.*'sd3'"):
        load_preset("flux-golden-hour", family="sd3")
    with pytest.raises(ValueError, match=r"'sd3-blue'.*family 'flux'.*flux-golden-hour"):
        load_preset("sd3-blue", num_layers=24, num_heads=24, family="flux")


@pytest.mark.parametrize(
    "name, layers, heads, model",
    [
        ("sd3-shadow", 38, 38, "38 layers x 38 heads"),  # SD3.5-large
        ("sd3-shadow", 24, 32, "24 layers x 32 heads"),
        ("flux-cool-tone", 24, 24, "24 layers x 24 heads"),
        ("flux-cool-tone", 4, None, r"4 layers x \? heads"),
    ],
)
def test_wrong_shape(name, layers, heads, model):
    preset = preset_info(name)
    with pytest.raises(ValueError, match=rf"'{name}' was found on .*{preset.shape}.*this model has {model}"):
        load_preset(name, num_layers=layers, num_heads=heads, family=preset.family)


def test_presets_are_package_data():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1]
    assert re.search(r'^headpag = \[[^\]]*"presets/\*\.json"', section, re.MULTILINE)
    assert all(Path(f.name).match("*.json") for f in PRESET_FILES)
