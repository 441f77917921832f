"""The model catalogue: models and metrics registered by name through entry points (the testbed's, a third party's)."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint

import pytest
import torch

from headpag.eval.registry import feature_names, load_pair_metric, pair_metric_names
from headpag.models import catalog, load_pipeline
from headpag.models.tiny import tiny_sd3_components
from headpag.pipelines.sd3 import StableDiffusion3HeadPAGPipeline


def test_the_testbed_registers_its_model_and_metrics():
    assert "headpag-shapes" in catalog.builtin_models()
    assert catalog.offline_models()[: len(catalog.builtin_models())] == catalog.builtin_models()
    assert {"shapes-judge", "shapes-correct"} <= set(pair_metric_names())
    assert feature_names() == ["shapes-judge"]
    assert catalog.model_defaults("headpag-shapes")["size"] == 96
    assert catalog.model_defaults("stabilityai/stable-diffusion-3-medium-diffusers") == {}


FOLDER = {}  # the registered object of the third-party model below (filled by the test)


def test_a_third_party_registers_a_model_by_entry_point(tmp_path, monkeypatch):
    torch.manual_seed(0)
    StableDiffusion3HeadPAGPipeline(**tiny_sd3_components()).save_pretrained(tmp_path / "mine")
    config = tmp_path / "mine" / "headpag_config.json"  # the model's folder recommends its sampler settings
    config.write_text(json.dumps({**json.loads(config.read_text()), "sampler": {"steps": 3}}))
    FOLDER.update(folder=tmp_path / "mine")
    extra = EntryPoint("my-model", f"{__name__}:FOLDER", "headpag.models")
    original = catalog.entry_points

    def entry_points(group):
        return [*original(group=group), *([extra] if group == "headpag.models" else [])]

    monkeypatch.setattr(catalog, "entry_points", entry_points)
    catalog._entries.cache_clear()
    try:
        assert "my-model" in catalog.offline_models()
        assert catalog.model_defaults("my-model") == {"steps": 3}
        pipe = load_pipeline("my-model")
        assert isinstance(pipe, StableDiffusion3HeadPAGPipeline)
        with pytest.raises(ValueError, match="Unknown metric 'nope'; allowed: shapes-correct, shapes-judge"):
            load_pair_metric("nope")
        (tmp_path / "mine" / "model_index.json").unlink()
        with pytest.raises(FileNotFoundError, match="'my-model' is not installed"):
            load_pipeline("my-model")
    finally:
        catalog._entries.cache_clear()


def test_a_models_recommendations_live_in_its_folder_and_survive_save_and_load(tmp_path):
    """`headpag_config.json` says what a model recommends: the head-PAG defaults for the classes and, in `sampler`,
    the CLI's and UI's starting settings (never read by pipeline calls); `save_pretrained` keeps it."""
    import json

    folder = catalog.builtin_folder("headpag-shapes")
    sampler = json.loads((folder / "headpag_config.json").read_text())["sampler"]
    assert catalog.model_defaults("headpag-shapes") == sampler and sampler["size"] == 96
    pipe = load_pipeline("headpag-shapes")
    pipe.save_pretrained(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "headpag_config.json").read_text())["sampler"] == sampler
    again = type(pipe).from_pipe(pipe)
    again.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "headpag_config.json").read_text())["sampler"] == sampler
