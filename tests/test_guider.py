"""
`HeadPerturbedAttentionGuidance` on modular SD3: PAG alone, CFG and PAG windows of their own, and exception safety,
each against a denoising loop written by hand in this file (stock transformer, explicit attention-map oracle).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.modular_pipelines.stable_diffusion_3 import StableDiffusion3AutoBlocks

from headpag import HeadPerturbedAttentionGuidance, HeadSet, StableDiffusion3HeadPAGPipeline
from headpag.guidance import Perturbation
from headpag.models.tiny import tiny_sd3_components
from headpag.runtime import describe_transformer
from headpag.testing.processors import reference_forward


HEADS, G, S, U, STEPS = "1, 2.0", 4.0, 2.0, 0.7, 4
SIZE = dict(height=32, width=32, max_sequence_length=32)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@torch.no_grad()
def hand_loop(components, cfg_steps, pag_steps, g=G, s=S) -> torch.Tensor:
    """`v = v_c [+ g (v_c - v_u) on cfg_steps, from v_u] [+ s (v_c - v_p) on pag_steps]`, step by step."""
    pipe = StableDiffusion3Pipeline(**components)
    pe, npe, pp, npp = pipe.encode_prompt("a cat", "a cat", "a cat", negative_prompt="", max_sequence_length=32)
    latents = pipe.prepare_latents(1, 4, 32, 32, pe.dtype, torch.device("cpu"), gen(), None)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    layout = describe_transformer(pipe.transformer)
    heads = HeadSet.parse(HEADS).resolve(layout.num_layers, layout.num_heads)
    for i, t in enumerate(scheduler.timesteps):

        def call(e, p, x=latents, t=t):
            return dict(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=e, pooled_projections=p)

        v_c = pipe.transformer(**call(pe, pp), return_dict=False)[0]
        v = v_c
        if i in cfg_steps:
            v_u = pipe.transformer(**call(npe, npp), return_dict=False)[0]
            v = v_u + g * (v_c - v_u)
        if i in pag_steps:
            v_p = reference_forward(pipe.transformer, dict(call(pe, pp), return_dict=False), [heads], Perturbation(U))
            v = v + s * (v_c - v_p[0])
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return latents


def modular(components, guider):
    pipe = StableDiffusion3AutoBlocks().init_pipeline()
    pipe.update_components(**components, guider=guider)
    return pipe


def run(pipe):
    return pipe(
        prompt="a cat", negative_prompt="", num_inference_steps=STEPS, **SIZE, generator=gen(), output="latents"
    )


@torch.no_grad()
def test_cfg_and_pag_each_on_their_own_window():
    components = tiny_sd3_components()
    full = HeadPerturbedAttentionGuidance(guidance_scale=G, pag_scale=S, pag_heads=HEADS, pag_identity_weight=U)
    torch.testing.assert_close(
        run(modular(components, full)), hand_loop(components, range(4), range(4)), atol=5e-5, rtol=0
    )
    narrow_cfg = HeadPerturbedAttentionGuidance(
        guidance_scale=G, pag_scale=S, pag_heads=HEADS, pag_identity_weight=U, start=0.0, stop=0.5
    )
    expected = hand_loop(components, range(2), range(4))
    torch.testing.assert_close(run(modular(components, narrow_cfg)), expected, atol=5e-5, rtol=0)
    narrow_pag = HeadPerturbedAttentionGuidance(
        guidance_scale=G, pag_scale=S, pag_heads=HEADS, pag_identity_weight=U, pag_start=0.25, pag_stop=0.75
    )
    torch.testing.assert_close(
        run(modular(components, narrow_pag)), hand_loop(components, range(4), range(1, 3)), atol=5e-5, rtol=0
    )


@torch.no_grad()
def test_pag_only_equals_the_class_with_guidance_scale_one():
    components = tiny_sd3_components()
    guider = HeadPerturbedAttentionGuidance(guidance_scale=1.0, pag_scale=S, pag_heads=HEADS, pag_identity_weight=U)
    got = run(modular(components, guider))
    expected = hand_loop(components, (), range(4))
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)
    ours = StableDiffusion3HeadPAGPipeline(**components)
    cls = ours(
        "a cat", negative_prompt="", num_inference_steps=STEPS, **SIZE, output_type="latent", guidance_scale=1.0,
        pag_scale=S, pag_heads=HEADS, pag_identity_weight=U, generator=gen(),
    ).images  # fmt: skip
    torch.testing.assert_close(got, cls, atol=5e-5, rtol=0)
    assert not torch.allclose(got, hand_loop(components, (), ()), atol=1e-4)  # PAG did act


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@torch.no_grad()
def test_a_failed_run_leaves_nothing_behind(error):
    """A run that raises inside the perturbed batch: stock calls on the same transformer stay exact, and the next
    modular runs (same thread and another thread) are right."""
    components = tiny_sd3_components()
    guider = HeadPerturbedAttentionGuidance(guidance_scale=G, pag_scale=S, pag_heads=HEADS, pag_identity_weight=U)
    pipe = modular(components, guider)
    transformer = components["transformer"]
    calls = []

    def fail(module, args, kwargs):
        calls.append(1)
        if len(calls) == 6:  # step 1, the perturbed batch (cond, uncond, perturbed per step)
            raise error("boom")

    handle = transformer.register_forward_pre_hook(fail, with_kwargs=True)
    with pytest.raises(error, match="boom"):
        run(pipe)
    handle.remove()
    stock = StableDiffusion3Pipeline(**components)
    kwargs = dict(num_inference_steps=2, **SIZE, output_type="latent", guidance_scale=G)
    fresh = StableDiffusion3Pipeline(**tiny_sd3_components())
    assert torch.equal(
        stock("a dog", **kwargs, generator=gen()).images, fresh("a dog", **kwargs, generator=gen()).images
    )
    expected = hand_loop(components, range(4), range(4))
    torch.testing.assert_close(run(pipe), expected, atol=5e-5, rtol=0)
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault("other", run(modular(components, guider))))
    thread.start()
    thread.join()
    torch.testing.assert_close(results["other"], expected, atol=5e-5, rtol=0)


def test_modular_flux_is_documented_as_unsupported():
    doc = HeadPerturbedAttentionGuidance.__doc__
    assert "Modular FLUX.1 is not supported" in doc
