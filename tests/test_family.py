"""`head_pag` on every SD3 / FLUX pipeline of diffusers: u = 0 equals no PAG, PAG acts, two images per prompt work,
and ControlNet residuals, Kontext reference tokens, masks and control latents reach the perturbed rows."""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch
from diffusers import FluxControlNetModel, SD3ControlNetModel
from PIL import Image

from headpag import head_pag
from headpag.models.tiny import tiny_flux_components, tiny_sd3_components


IMAGE = Image.new("RGB", (32, 32), (200, 60, 40))
MASK = Image.new("L", (32, 32), 255)
CONTROL = Image.new("RGB", (32, 32), (10, 220, 90))


def sd3_controlnet(extra_conditioning_channels: int = 0) -> SD3ControlNetModel:
    torch.manual_seed(5)
    return SD3ControlNetModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=96,
        extra_conditioning_channels=extra_conditioning_channels,
    ).eval()


def flux_controlnet() -> FluxControlNetModel:
    torch.manual_seed(5)
    return FluxControlNetModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ).eval()


# name -> (components factory, call arguments)
CASES = {
    "StableDiffusion3Pipeline": (tiny_sd3_components, {}),
    "StableDiffusion3Img2ImgPipeline": (tiny_sd3_components, {"image": IMAGE, "strength": 0.9}),
    "StableDiffusion3InpaintPipeline": (
        lambda: tiny_sd3_components(latent_channels=16),
        {"image": IMAGE, "mask_image": MASK, "strength": 0.9},
    ),
    "StableDiffusion3ControlNetPipeline": (
        lambda: {**tiny_sd3_components(), "controlnet": sd3_controlnet()},
        {"control_image": CONTROL},
    ),
    "StableDiffusion3ControlNetInpaintingPipeline": (
        lambda: {**tiny_sd3_components(), "controlnet": sd3_controlnet(1)},
        {"control_image": CONTROL, "control_mask": MASK},
    ),
    "FluxPipeline": (tiny_flux_components, {}),
    "FluxImg2ImgPipeline": (tiny_flux_components, {"image": IMAGE, "strength": 0.9}),
    "FluxInpaintPipeline": (tiny_flux_components, {"image": IMAGE, "mask_image": MASK, "strength": 0.9}),
    "FluxFillPipeline": (lambda: tiny_flux_components(in_channels=48), {"image": IMAGE, "mask_image": MASK}),
    "FluxKontextPipeline": (tiny_flux_components, {"image": IMAGE, "_auto_resize": False, "max_area": 32 * 32}),
    "FluxKontextInpaintPipeline": (
        tiny_flux_components,
        {"image": IMAGE, "mask_image": MASK, "strength": 0.9, "_auto_resize": False, "max_area": 32 * 32},
    ),
    "FluxControlPipeline": (lambda: tiny_flux_components(in_channels=32), {"control_image": CONTROL}),
    "FluxControlImg2ImgPipeline": (
        lambda: tiny_flux_components(in_channels=32),
        {"image": IMAGE, "control_image": CONTROL, "strength": 0.9},
    ),
    "FluxControlInpaintPipeline": (
        lambda: tiny_flux_components(in_channels=32),
        {"image": IMAGE, "control_image": CONTROL, "mask_image": MASK, "strength": 0.9},
    ),
    "FluxControlNetPipeline": (
        lambda: {**tiny_flux_components(), "controlnet": flux_controlnet()},
        {"control_image": CONTROL},
    ),
    "FluxControlNetImg2ImgPipeline": (
        lambda: {**tiny_flux_components(), "controlnet": flux_controlnet()},
        {"image": IMAGE, "control_image": CONTROL, "strength": 0.9},
    ),
    "FluxControlNetInpaintPipeline": (
        lambda: {**tiny_flux_components(), "controlnet": flux_controlnet()},
        {"image": IMAGE, "control_image": CONTROL, "mask_image": MASK, "strength": 0.9},
    ),
}


# One call of every test here: two images per prompt, 2 steps, latents.
CALL = dict(
    prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="latent", max_sequence_length=32,
    num_images_per_prompt=2,
)  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_head_pag_on_every_pipeline(name):
    pipe, extra = build(name)
    guidance = guidance_settings(name, cfg=True)  # FLUX pipelines without true CFG: none

    def run(**pag):
        kwargs = dict(CALL, generator=torch.Generator().manual_seed(0), **guidance, **extra)
        if pag:
            with head_pag(pipe, pag_heads="1, 2.0", **pag):
                return pipe(**kwargs).images
        return pipe(**kwargs).images

    plain = run()
    u0 = run(pag_identity_weight=0.0)
    torch.testing.assert_close(u0, plain, atol=2e-6, rtol=0)
    u1 = run(pag_identity_weight=1.0)
    assert torch.isfinite(u1).all()
    assert not torch.allclose(u1, plain, atol=1e-4)
    sequential = run(pag_identity_weight=1.0, pag_sequential=True, pag_share_prefix=False)
    torch.testing.assert_close(sequential, u1, atol=2e-5, rtol=0)


def build(name):
    factory, extra = CASES[name]
    cls = getattr(diffusers, name)
    expected, optional = cls._get_signature_keys(cls)
    pipe = cls(**{k: v for k, v in factory().items() if k in set(expected) | set(optional)})
    pipe.set_progress_bar_config(disable=True)
    return pipe, extra


def guidance_settings(name, cfg: bool) -> dict:
    cls = getattr(diffusers, name)
    if name.startswith("StableDiffusion3"):
        return {"guidance_scale": 4.0 if cfg else 1.0}
    if "true_cfg_scale" not in inspect.signature(cls.__call__).parameters:
        return {}
    return {"negative_prompt": "blur", "true_cfg_scale": 2.0} if cfg else {}


TRUE_CFG = [n for n in CASES if n.startswith("Flux") and guidance_settings(n, True)]
NO_TRUE_CFG = [n for n in CASES if n.startswith("Flux") and not guidance_settings(n, True)]


def test_exactly_six_flux_pipelines_take_true_cfg():
    assert sorted(TRUE_CFG) == sorted(
        ["FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline",
         "FluxKontextInpaintPipeline", "FluxControlNetPipeline"]
    )  # fmt: skip
    assert len(NO_TRUE_CFG) == 6


@pytest.mark.parametrize(
    "name, cfg",
    [(n, True) for n in CASES] + [(n, False) for n in CASES if n.startswith("StableDiffusion3") or n in TRUE_CFG],
)
@torch.no_grad()
def test_pag_equals_the_hand_combined_reference(name, cfg):
    """
    `[stock guidance] + s (v_c - v_p)` with v_c the positive prompt's rows: FLUX true CFG gives
    `v_n + g (v_c - v_n) + s (v_c - v_p)` on all six pipelines that have it (the perturbed pass is the positive
    prompt's, whatever cache contexts the pipeline sets), the others `v_c + s (v_c - v_p)`; SD3 with and without CFG.
    """
    from pag_reference import positive_embeds, reference_pag

    pipe, extra = build(name)
    kwargs = dict(CALL, **guidance_settings(name, cfg), **extra)
    s, u, heads = 2.0, 0.7, "1, 2.0"
    positive = positive_embeds(pipe, "a cat", max_sequence_length=32)
    with reference_pag(pipe, heads, s, u, positive):
        expected = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    with head_pag(pipe, pag_heads=heads, pag_scale=s, pag_identity_weight=u):
        got = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(expected, plain, atol=1e-4)  # the term matters
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)
