"""
The FLUX sibling of the testbed (`headpag-shapes-flux`): the windowed T5 and its exactly-zero pads, the compact
training sequence against stock diffusers' padded forward, stock loading, true CFG, head PAG against the
hand-written reference on double- and single-stream heads, and a quick training run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from headpag import head_pag, load_pipeline
from headpag.models.catalog import builtin_folder, model_defaults
from headpag.runtime import describe_transformer
from headpag.testbed import data
from headpag.testbed.flux import PAD_TOKENS, content_length, multiplicity_bias


PROMPTS = [
    "a red circle left of a blue triangle on a white background",
    "a large striped black square on a yellow background at the top left",
    "a small white circle on a green background",
]


@pytest.fixture(scope="module")
def stock():
    pipe = FluxPipeline.from_pretrained(builtin_folder("headpag-shapes-flux"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_model_is_registered_with_a_folder_and_advice():
    folder = builtin_folder("headpag-shapes-flux")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    advice = model_defaults("headpag-shapes-flux")
    data.parse_prompt(advice["prompt"])
    assert advice["size"] == data.IMAGE_SIZE


@torch.no_grad()
def test_t5_pads_past_the_window_are_exactly_zero(stock):
    """Every pad more than `T5_WINDOW` tokens after `</s>` is the zero vector, whatever the prompt and length."""
    for length in (PAD_TOKENS, 40):
        ids = stock.tokenizer_2(PROMPTS + [""], padding="max_length", max_length=length, return_tensors="pt")
        embeds = stock.text_encoder_2(ids.input_ids)[0]
        lengths = content_length(ids.input_ids)
        for row, n in enumerate(lengths.tolist()):
            assert torch.count_nonzero(embeds[row, n:]) == 0
            assert embeds[row, n - 1].abs().sum() > 0  # the last window pad still carries `</s>`
    words = stock.tokenizer_2.tokenize(PROMPTS[0])
    assert len(words) == len(PROMPTS[0].split())  # one piece per grammar word
    # word order matters: swapping the colours changes the embeddings (a bag of words would not)
    swapped = PROMPTS[0].replace("red", "X").replace("blue", "red").replace("X", "blue")
    a, b = (
        stock.text_encoder_2(stock.tokenizer_2(p, return_tensors="pt").input_ids)[0] for p in (PROMPTS[0], swapped)
    )
    assert not torch.allclose(a.sort(1).values, b.sort(1).values)


@torch.no_grad()
def test_the_compact_training_sequence_equals_stock_diffusers_padded_forward(stock):
    """What training computes (content + one zero pad standing for the rest) equals the transformer on the 512
    tokens `FluxPipeline` feeds, for any number of pads."""
    embeds, pooled, text_ids = stock.encode_prompt(PROMPTS, None, max_sequence_length=PAD_TOKENS)
    ids = stock.tokenizer_2(PROMPTS, padding="max_length", max_length=PAD_TOKENS, return_tensors="pt").input_ids
    lengths = content_length(ids)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(len(PROMPTS), 144, 16, generator=g)
    image_ids = stock._prepare_latent_image_ids(1, 12, 12, "cpu", torch.float32)
    t = torch.tensor([0.2, 0.5, 0.9])
    full = stock.transformer(latents, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                             txt_ids=text_ids, img_ids=image_ids).sample  # fmt: skip
    tokens = int(lengths.max()) + 1
    bias = multiplicity_bias(lengths, tokens, PAD_TOKENS - lengths, 144)
    compact = stock.transformer(latents, encoder_hidden_states=embeds[:, :tokens], pooled_projections=pooled,
                                timestep=t, txt_ids=text_ids[:tokens], img_ids=image_ids,
                                joint_attention_kwargs={"attention_mask": bias}).sample  # fmt: skip
    torch.testing.assert_close(compact, full, atol=2e-5, rtol=1e-4)
    fewer = multiplicity_bias(lengths, tokens, PAD_TOKENS - lengths - 100, 144)
    other = stock.transformer(latents, encoder_hidden_states=embeds[:, :tokens], pooled_projections=pooled,
                              timestep=t, txt_ids=text_ids[:tokens], img_ids=image_ids,
                              joint_attention_kwargs={"attention_mask": fewer}).sample  # fmt: skip
    assert (other - full).abs().max() > 1e-4  # the count matters: the test would see a wrong one
    with pytest.raises(ValueError, match="leaves no zero pad"):
        multiplicity_bias(lengths, int(lengths.max()), PAD_TOKENS - lengths, 144)


@torch.no_grad()
def test_the_training_step_predicts_what_stock_diffusers_predicts_on_512_tokens(stock):
    """`flux_prompt_table` and `_FluxTask.predict` (with the pad count drawn at its maximum) against stock
    `encode_prompt` at 512 tokens and the transformer on them, with diffusers' own packing."""
    from headpag.testbed.train import Schedule, _FluxTask

    class Largest:  # a numpy generator whose uniform draws are all 1: counts = 512 - content
        def uniform(self, low, high, size):
            return np.ones(size)

    task = _FluxTask(stock, Schedule())
    rows = [task.index[p] for p in PROMPTS] + [0]
    full, full_pooled, text_ids = stock.encode_prompt(PROMPTS + [""], None, max_sequence_length=PAD_TOKENS)
    tokens = task.embeds.shape[1]
    torch.testing.assert_close(task.embeds[rows], full[:, :tokens])
    assert torch.count_nonzero(full[:, tokens:]) == 0 and task.lengths.max() == tokens - 1
    torch.testing.assert_close(task.pooled[rows], full_pooled)
    noisy = torch.randn(len(rows), 4, 24, 24, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 0.4, 0.7, 0.95])
    got = task.predict(stock.transformer, noisy, rows, sigma, Largest())
    packed = stock._pack_latents(noisy, len(rows), 4, 24, 24)
    image_ids = stock._prepare_latent_image_ids(1, 12, 12, "cpu", torch.float32)
    out = stock.transformer(packed, encoder_hidden_states=full, pooled_projections=full_pooled, timestep=sigma,
                            txt_ids=text_ids, img_ids=image_ids).sample  # fmt: skip
    torch.testing.assert_close(got, stock._unpack_latents(out, 96, 96, stock.vae_scale_factor), atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_stock_loading_is_deterministic_and_true_cfg_acts(stock):
    def run(seed, **kwargs):
        return stock(PROMPTS[2], num_inference_steps=4, height=96, width=96, output_type="np",
                     generator=torch.Generator().manual_seed(seed), **kwargs).images[0]  # fmt: skip

    assert stock.transformer.config.guidance_embeds is False
    assert describe_transformer(stock.transformer).num_layers == 12  # 4 double-stream + 8 single-stream
    first = run(0)
    assert first.shape == (96, 96, 3)
    np.testing.assert_array_equal(first, run(0))
    assert np.abs(first - run(1)).max() > 0.05
    cfg = run(0, negative_prompt="", true_cfg_scale=4.0)
    assert np.abs(cfg - first).max() > 0.05


@pytest.mark.parametrize("heads", ["1.3, 2", "5.0, 9"])  # double-stream, single-stream
@torch.no_grad()
def test_head_pag_on_the_flux_testbed_equals_the_hand_written_reference(stock, heads):
    from pag_reference import positive_embeds, reference_pag

    kwargs = dict(prompt=PROMPTS[0], negative_prompt="", true_cfg_scale=3.0, num_inference_steps=3, height=96,
                  width=96, output_type="latent", max_sequence_length=48)  # fmt: skip
    s, u = 2.0, 0.6
    positive = positive_embeds(stock, PROMPTS[0], max_sequence_length=48)
    with reference_pag(stock, heads, s, u, positive):
        expected = stock(**kwargs, generator=torch.Generator().manual_seed(0)).images
    plain = stock(**kwargs, generator=torch.Generator().manual_seed(0)).images
    with head_pag(stock, pag_heads=heads, pag_scale=s, pag_identity_weight=u):
        got = stock(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(expected, plain, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)


@torch.no_grad()
def test_headpag_class_reads_the_folder_defaults_and_pag_scale_zero_is_stock(stock):
    pipe = load_pipeline("headpag-shapes-flux")
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPTS[1], num_inference_steps=3, height=96, width=96, output_type="np",
                max_sequence_length=48)  # fmt: skip
    zero = pipe(**call, pag_scale=0.0, generator=torch.Generator().manual_seed(3)).images
    reference = stock(**call, generator=torch.Generator().manual_seed(3)).images
    np.testing.assert_allclose(zero, reference, atol=1e-6)
    assert pipe.pag_defaults["pag_scale"] > 0  # the folder recommends a PAG configuration
    default = pipe(**call, generator=torch.Generator().manual_seed(3)).images
    assert np.abs(default - zero).max() > 1e-3


def test_flux_training_script_runs_to_completion(tmp_path):
    from headpag.testbed.train import main

    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    assert main(["--quick", "--model", "flux", "--out", str(out), "--checkpoints", str(checkpoints)]) == 0
    record = json.loads((out / "training-flux.json").read_text())
    assert record["model"] == "flux" and set(record["seconds"]) == {"vae", "judge", "latents", "flux"}
    assert (out / "loss-flux.png").is_file() and not (out / "training.json").exists()
    assert not any(p.name.startswith(".") for p in [*out.iterdir(), *checkpoints.iterdir()])
    pipe = FluxPipeline.from_pretrained(out / "shapes-flux")
    image = pipe("a small red square on a white background", num_inference_steps=2, height=96, width=96,
                 max_sequence_length=32, output_type="np").images  # fmt: skip
    assert image.shape == (1, 96, 96, 3)


@pytest.mark.slow
def test_the_flux_experiments_run_end_to_end_in_smoke_mode(tmp_path):
    """`benchmarks/testbed_flux_experiments.py --quick`: every experiment on tiny counts, the page and its figures."""
    import importlib.util
    import os
    import sys

    folder = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(
            "testbed_flux_experiments", os.path.join(folder, "testbed_flux_experiments.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        docs = tmp_path / "docs"
        assert module.main(["--quick", "--out", str(tmp_path / "out"), "--docs", str(docs)]) == 0
    finally:
        sys.path.remove(folder)
    page = (docs / "testbed-flux.md").read_text()
    for section in ("## 0. Is the model clean?", "## 1. Does true CFG work?", "## 2. The PAG paper's regimes",
                    "## 3. The shipped default"):  # fmt: skip
        assert section in page
    assert all((docs / "testbed" / f).is_file() for f in ("flux-regimes.png", "flux-samples.png", "flux-results.json"))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["regimes"]) == {"no CFG", "low CFG", "CFG"} and results["images"] > 0
