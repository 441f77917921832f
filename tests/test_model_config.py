"""Per-model defaults in one file: the `pag` section of `headpag_config.json`, read by pipeline calls (headpag's
classes and `head_pag` on a stock pipeline), the CLI and the UI; sampler advice read by the CLI and the UI only."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from headpag import FluxHeadPAGPipeline, StableDiffusion3HeadPAGPipeline, head_pag, load_pipeline
from headpag.pipelines.model_config import BUILTIN_PAG_DEFAULTS, CONFIG_FILE, check_pag_defaults, pag_defaults


COMMON = dict(num_inference_steps=3, height=32, width=32, output_type="latent", max_sequence_length=32)
RECOMMENDED = {"pag_scale": 2.0, "pag_identity_weight": 0.5, "pag_interval": [0.0, 0.75]}
HEADS = {"tiny-sd3": "1.0, 1.1", "tiny-flux": "2.0, 3.1"}
CLASSES = {"tiny-sd3": (StableDiffusion3HeadPAGPipeline, StableDiffusion3Pipeline), "tiny-flux": (
    FluxHeadPAGPipeline, FluxPipeline)}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(HEADS))
def folder(request, tmp_path_factory):
    """A tiny model saved with recommended PAG values and heads, as a model author would ship it."""
    name = request.param
    path = tmp_path_factory.mktemp("models") / name
    pipe = load_pipeline(name)
    pipe.set_pag_heads(HEADS[name])
    pipe.set_pag_defaults(**RECOMMENDED)
    pipe.save_pretrained(path)
    return name, path


def run(pipe, seed: int = 0, **kwargs):
    out = pipe("a photo", generator=torch.Generator().manual_seed(seed), guidance_scale=4.0, **COMMON, **kwargs)
    return out.images


def explicit(name: str) -> dict:
    return dict(pag_heads=HEADS[name], pag_scale=2.0, pag_identity_weight=0.5, pag_interval=(0.0, 0.75))


def test_the_folder_says_it_in_one_file(folder):
    name, path = folder
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["pag"] == RECOMMENDED and config["pag_heads"] is not None


def test_our_class_and_a_stock_pipeline_take_the_models_defaults(folder):
    """A call without `pag_*` arguments equals the call that names the recommended values; on a stock pipeline loaded
    from the same folder, `head_pag(pipe)` reads them too."""
    name, path = folder
    ours_class, stock_class = CLASSES[name]
    ours = ours_class.from_pretrained(path)
    assert ours.pag_defaults == {**BUILTIN_PAG_DEFAULTS, **RECOMMENDED, "pag_interval": (0.0, 0.75)}
    reference = run(ours, **explicit(name))
    for _ in range(2):
        assert torch.equal(run(ours), reference)
    built_in = run(ours, pag_heads=HEADS[name], pag_scale=3.0, pag_identity_weight=1.0, pag_interval=(0.0, 1.0))
    assert not torch.equal(built_in, reference)
    stock = stock_class.from_pretrained(path)
    with head_pag(stock):
        assert torch.equal(run(stock), reference)
    assert pag_defaults(stock)["pag_scale"] == 2.0


def test_pag_scale_zero_stays_the_parent_pipeline_bit_for_bit(folder):
    name, path = folder
    ours_class, stock_class = CLASSES[name]
    stock = stock_class.from_pretrained(path)
    assert torch.equal(run(ours_class.from_pretrained(path), pag_scale=0.0), run(stock))


def test_defaults_survive_save_and_from_pipe_and_can_be_reset(folder, tmp_path):
    name, path = folder
    ours_class, stock_class = CLASSES[name]
    ours = ours_class.from_pretrained(path)
    ours.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / CONFIG_FILE).read_text())["pag"] == RECOMMENDED
    assert ours_class.from_pipe(ours).pag_defaults["pag_scale"] == 2.0
    ours.set_pag_defaults()
    assert ours.pag_defaults == BUILTIN_PAG_DEFAULTS


def test_precedence_call_over_block_over_model(folder):
    """An explicit call argument beats its `with head_pag(...)` block, which beats the model's recommendation; a
    `None` in the call is no argument (the block's value stands)."""
    name, path = folder
    ours_class, stock_class = CLASSES[name]
    ours = ours_class.from_pretrained(path)
    block_values = dict(pag_heads=HEADS[name], pag_scale=1.0, pag_identity_weight=0.5, pag_interval=(0.0, 0.75))
    reference = run(ours, **block_values)
    with head_pag(ours, pag_scale=1.0):
        assert torch.equal(run(ours), reference)
        assert torch.equal(run(ours, pag_scale=None), reference)
        assert torch.equal(run(ours, pag_scale=2.0), run(ours_class.from_pretrained(path)))
    stock = stock_class.from_pretrained(path)
    with head_pag(stock, pag_scale=1.0):
        assert torch.equal(run(stock), reference)


def test_from_pipe_of_a_stock_pipeline_takes_its_folders_defaults(folder):
    name, path = folder
    ours_class, stock_class = CLASSES[name]
    ours = ours_class.from_pipe(stock_class.from_pretrained(path))
    assert ours.pag_defaults["pag_scale"] == 2.0 and str(ours.pag_heads) == str(
        ours_class.from_pretrained(path).pag_heads
    )
    assert torch.equal(run(ours), run(ours_class.from_pretrained(path), **explicit(name)))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"pag_sequential": "false"}, "pag_sequential must be true or false"),
        ({"pag_heads": "1.x"}, "pag_heads '1.x' is not a head set"),
        ({"sampler": {"steps": 20.0}}, r"sampler steps must be an integer in \[1, 1000\], got 20.0"),
        ({"sampler": {"steps": True}}, "sampler steps must be an integer"),
        ({"sampler": {"size": 100}}, "sampler size must be a multiple of 16"),
        ({"sampler": {"guidance": 10**400}}, "sampler guidance must be a finite number"),
        ({"sampler": {"prompt": 3}}, "sampler prompt must be a string"),
        ({"sampler": {"true_cfg": 0.5}}, r"sampler true_cfg must be a finite number >= 1, got 0.5"),
        ({"sampler": {"stpes": 3}}, r"unknown sampler setting\(s\) \['stpes'\]"),
        ({"pag": {"pag_reuse": True}}, "pag_reuse must be an integer"),
        ({"pag": {"pag_scale": True}}, "pag_scale must be a finite number"),
    ],
)
def test_a_malformed_config_is_refused_naming_the_file_and_value(tmp_path, section, message):
    from headpag.pipelines.model_config import read_headpag_config

    (tmp_path / CONFIG_FILE).write_text(json.dumps({"class": "StableDiffusion3HeadPAGPipeline", **section}))
    with pytest.raises(ValueError, match=message) as error:
        read_headpag_config(tmp_path)
    assert CONFIG_FILE in str(error.value)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"pag_scael": 2.0}, r"unknown PAG default\(s\) \['pag_scael'\]; allowed: pag_scale"),
        ({"pag_identity_weight": 2.0}, r"\[0, 1\]"),
        ({"pag_scale": math.nan}, "pag_scale must be a finite number"),
        ({"pag_scale": "3"}, "pag_scale must be a finite number"),
        ({"pag_interval": [0.5]}, "pag_interval must be two numbers"),
        ({"pag_share_prefix": 1}, "pag_share_prefix must be true or false"),
        ({"pag_target": "blur"}, "blur"),
    ],
)
def test_bad_recommendations_are_refused_naming_the_value(values, message):
    with pytest.raises(ValueError, match=message):
        check_pag_defaults(values, where="x.json")


def test_a_malformed_pag_section_names_the_file(tmp_path):
    pipe = load_pipeline("tiny-sd3")
    pipe.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps({**config, "pag": {"pag_scale": -1.0}}))
    with pytest.raises(ValueError, match=r"headpag_config.json: .*pag_scale"):
        StableDiffusion3HeadPAGPipeline.from_pretrained(tmp_path / "m")
    stock = StableDiffusion3Pipeline.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"headpag_config.json"):
        with head_pag(stock):
            pass


def test_the_cli_takes_the_models_defaults_and_writes_what_ran(tmp_path):
    from headpag.cli import main

    pipe = load_pipeline("tiny-sd3")
    pipe.set_pag_heads(HEADS["tiny-sd3"])
    pipe.set_pag_defaults(**RECOMMENDED)
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(tmp_path / "model"), "--prompt", "a photo", "--steps", "2"]
    assert main([*argv, "--height", "32", "--width", "32", "--output", str(out), "--no-progress"]) == 0
    ran = json.loads(Image.open(out).info["headpag"])
    assert ran["pag_scale"] == 2.0 and ran["pag_identity_weight"] == 0.5 and ran["pag_interval"] == [0.0, 0.75]
    assert ran["pag_heads"] == str(pipe.pag_heads)
    explicit_out = tmp_path / "explicit.png"
    flags = ["--pag-heads", HEADS["tiny-sd3"], "--pag-scale", "2", "--pag-identity-weight", "0.5", "--pag-interval"]
    assert main([*argv, "--height", "32", "--width", "32", "--output", str(explicit_out), "--no-progress",
                 *flags, "0", "0.75"]) == 0  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(explicit_out)))
    other = tmp_path / "other.png"
    assert main([*argv, "--height", "32", "--width", "32", "--output", str(other), "--no-progress",
                 "--pag-scale", "3"]) == 0  # fmt: skip
    assert json.loads(Image.open(other).info["headpag"])["pag_scale"] == 3.0
    compare = tmp_path / "compare.png"
    assert main([*argv, "--height", "32", "--width", "32", "--output", str(compare), "--no-progress",
                 "--compare"]) == 0  # fmt: skip
    without = json.loads(Image.open(tmp_path / "compare-nopag.png").info["headpag"])
    assert without["pag_scale"] == 0.0 and without["pag_identity_weight"] == 0.5  # spelled out, PAG off


def saved_with_advice(name: str, folder, sampler: dict):
    """A tiny model saved to `folder` whose headpag_config.json carries the `sampler` advice."""
    load_pipeline(name).save_pretrained(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["sampler"] = sampler
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def test_the_cli_takes_the_models_sampler_advice_for_flags_left_out(tmp_path):
    from headpag.cli import main

    saved_with_advice("tiny-sd3", tmp_path / "model", {"steps": 2, "size": 48, "guidance": 1.5})
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(tmp_path / "model"), "--prompt", "a photo", "--output", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    ran = json.loads(Image.open(out).info["headpag"])
    assert Image.open(out).size == (48, 48)
    assert (ran["num_inference_steps"], ran["guidance_scale"], ran["height"]) == (2, 1.5, 48)
    assert main([*argv, "--no-progress", "--steps", "1", "--height", "32", "--width", "32"]) == 0
    assert Image.open(out).size == (32, 32)


def test_the_cli_takes_a_flux_models_true_cfg_advice_against_the_empty_prompt(tmp_path):
    """`true_cfg` advice runs FLUX's true CFG against `""` when no negative prompt is given: the image equals stock
    diffusers' `FluxPipeline` called with `negative_prompt=""` and that scale."""
    from headpag.cli import main

    saved_with_advice("tiny-flux", tmp_path / "model", {"steps": 2, "size": 32, "true_cfg": 2.5})
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(tmp_path / "model"), "--prompt", "a photo", "--output", str(out)]
    assert main([*argv, "--no-progress", "--pag-scale", "0", "--max-sequence-length", "16"]) == 0
    ran = json.loads(Image.open(out).info["headpag"])
    assert (ran["true_cfg_scale"], ran["negative_prompt"], ran["num_inference_steps"]) == (2.5, "", 2)
    stock = FluxPipeline.from_pretrained(tmp_path / "model")
    stock.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="np")
    seed = ran["seed"]
    image = stock("a photo", negative_prompt="", true_cfg_scale=2.5, generator=torch.Generator().manual_seed(seed),
                  **kwargs).images[0]  # fmt: skip
    plain = stock("a photo", generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255
    assert np.abs(got - image).max() <= 1 / 255 + 1e-6 < np.abs(got - plain).max()


def test_the_ui_opens_with_the_models_defaults(tmp_path):
    from types import SimpleNamespace

    from headpag.app.tabs.common import AppContext
    from headpag.options import Limits

    pipe = load_pipeline("tiny-sd3")
    pipe.set_pag_defaults(pag_scale=2.0, pag_identity_weight=0.5, pag_reuse=2)
    host = SimpleNamespace(model_name="tiny-sd3", pipe=pipe, family="sd3")
    context = AppContext.__new__(AppContext)
    context.host, context.limits = host, Limits()
    d = context.family_defaults()
    assert (d["pag_scale"], d["pag_identity_weight"], d["pag_reuse"]) == (2.0, 0.5, 2)
    host.pipe = None
    assert context.family_defaults()["pag_scale"] == BUILTIN_PAG_DEFAULTS["pag_scale"]
