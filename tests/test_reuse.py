"""
`pag_reuse=k`: the perturbed branch runs on steps 0, k, 2k, ... of the PAG interval and the steps in between reuse
the last `v_c - v_p` times their own scale. Against the hand-combined reference (`pag_reuse` in `pag_reference`),
with prefix sharing, intervals, the adaptive scale, sequential mode, caches and the modular guider.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FirstBlockCacheConfig, FluxPipeline, StableDiffusion3Pipeline
from pag_reference import positive_embeds, reference_pag

from headpag import HeadPerturbedAttentionGuidance, StableDiffusion3HeadPAGPipeline, head_pag
from headpag.models.tiny import tiny_flux_components, tiny_sd3_components


HEADS, S, U = "1.0, 2", 2.0, 0.7
COMMON = dict(num_inference_steps=6, height=32, width=32, output_type="latent", max_sequence_length=32)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def family(name):
    if name == "sd3":
        pipe, guidance = StableDiffusion3Pipeline(**tiny_sd3_components()), dict(guidance_scale=4.0)
    else:
        pipe, guidance = FluxPipeline(**tiny_flux_components()), dict(negative_prompt="blur", true_cfg_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe, guidance


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("options", [{}, {"pag_sequential": True}, {"pag_share_prefix": False}])
@torch.no_grad()
def test_reuse_equals_the_reference(name, k, options):
    pipe, guidance = family(name)
    with reference_pag(pipe, HEADS, S, U, positive_embeds(pipe, "a cat", max_sequence_length=32), reuse=k):
        expected = pipe("a cat", **COMMON, **guidance, generator=gen()).images
    for _ in range(2):
        with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U, pag_reuse=k, **options):
            got = pipe("a cat", **COMMON, **guidance, generator=gen()).images
        torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)


@torch.no_grad()
def test_reuse_one_is_pag_bit_for_bit_and_k_skips_the_perturbed_rows():
    pipe, guidance = family("sd3")
    rows = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True, prepend=True
    )
    with head_pag(pipe, pag_heads=HEADS):
        default = pipe("a cat", **COMMON, **guidance, generator=gen()).images
    with head_pag(pipe, pag_heads=HEADS, pag_reuse=1):
        one = pipe("a cat", **COMMON, **guidance, generator=gen()).images
    assert torch.equal(default, one)
    rows.clear()
    with head_pag(pipe, pag_heads=HEADS, pag_reuse=3):
        pipe("a cat", **COMMON, **guidance, generator=gen())
    assert rows == [3, 2, 2, 3, 2, 2]  # [uncond, cond] + one perturbed row on steps 0 and 3 only


@torch.no_grad()
def test_reuse_with_an_interval_and_the_adaptive_scale():
    pipe, guidance = family("sd3")
    positive = positive_embeds(pipe, "a cat", max_sequence_length=32)
    with reference_pag(pipe, HEADS, S, U, positive, steps=range(2, 6), reuse=3):
        expected = pipe("a cat", **COMMON, **guidance, generator=gen()).images
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U, pag_reuse=3, pag_interval=(2 / 6, 1.0)):
        got = pipe("a cat", **COMMON, **guidance, generator=gen()).images
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)
    a = 0.004

    def scale_at(t):
        return max(0.0, S - a * (1000.0 - t))

    with reference_pag(pipe, HEADS, S, U, positive, reuse=2, scale_at=scale_at):
        expected = pipe("a cat", **COMMON, **guidance, generator=gen()).images
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U, pag_reuse=2, pag_adaptive_scale=a):
        got = pipe("a cat", **COMMON, **guidance, generator=gen()).images
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)


@torch.no_grad()
def test_reuse_under_a_cache_runs_sequentially_or_is_refused():
    pipe, guidance = family("flux")
    with head_pag(pipe, pag_heads=HEADS, pag_reuse=2):
        expected = pipe("a cat", **COMMON, **guidance, generator=gen()).images
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    with pytest.raises(ValueError, match=r"pag_reuse=2 would change the batch.*pag_sequential=True"):
        with head_pag(pipe, pag_heads=HEADS, pag_reuse=2):
            pytest.fail("the block must not run")
    with head_pag(pipe, pag_heads=HEADS, pag_reuse=2, pag_sequential=True):
        got = pipe("a cat", **COMMON, **guidance, generator=gen()).images
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


def test_bad_reuse_values_are_refused():
    pipe, _ = family("sd3")
    for bad in (0, -1, 2.5, True, "2", 10_000):
        with pytest.raises(ValueError, match=r"pag_reuse must be an integer in \[1, 1000\]"):
            with head_pag(pipe, pag_reuse=bad):
                pass
    with pytest.raises(ValueError, match="pag_reuse"):
        HeadPerturbedAttentionGuidance(pag_reuse=0)


@torch.no_grad()
def test_the_class_and_the_guider_take_pag_reuse():
    from diffusers.modular_pipelines.stable_diffusion_3 import StableDiffusion3AutoBlocks

    components = tiny_sd3_components()
    ours = StableDiffusion3HeadPAGPipeline(**components)
    kwargs = dict(COMMON, guidance_scale=4.0, negative_prompt="")
    expected = ours("a cat", **kwargs, pag_heads=HEADS, pag_scale=S, pag_reuse=2, generator=gen()).images
    full = ours("a cat", **kwargs, pag_heads=HEADS, pag_scale=S, generator=gen()).images
    assert not torch.allclose(expected, full, atol=1e-5)
    modular = StableDiffusion3AutoBlocks().init_pipeline()
    guider = HeadPerturbedAttentionGuidance(guidance_scale=4.0, pag_scale=S, pag_heads=HEADS, pag_reuse=2)
    modular.update_components(**components, guider=guider)
    got = modular(
        prompt="a cat", negative_prompt="", num_inference_steps=6, height=32, width=32, max_sequence_length=32,
        generator=gen(), output="latents",
    )  # fmt: skip
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)


def test_search_config_hashes_reuse_only_when_set(tmp_path):
    from headpag.search.config import SearchConfig

    base = SearchConfig(prompts=["a cat"], height=32, width=32)
    one = SearchConfig(prompts=["a cat"], height=32, width=32, pag_reuse=1)
    two = SearchConfig(prompts=["a cat"], height=32, width=32, pag_reuse=2)
    assert base.config_hash("m") == one.config_hash("m") != two.config_hash("m")
    assert "pag_reuse" not in one.to_dict() and two.to_dict()["pag_reuse"] == 2
    assert SearchConfig.from_dict(two.to_dict()) == two and SearchConfig.from_dict(one.to_dict()).pag_reuse == 1
    with pytest.raises(ValueError, match="pag_reuse must be an integer >= 1"):
        SearchConfig(prompts=["a cat"], pag_reuse=0)
