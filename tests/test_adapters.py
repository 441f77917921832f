"""
Head-level PAG beside LoRA (adapter active, `set_adapters`, `fuse_lora`), fused QKV projections and FLUX's
IP-Adapter with a tiny image encoder: two calls each, against PAG combined by hand (`pag_reference`) on the same
stock pipeline.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from pag_reference import positive_embeds, reference_pag
from peft import LoraConfig
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from headpag import head_pag
from headpag.models.tiny import tiny_flux_components, tiny_sd3_components


HEADS, S, U = "1, 2.0", 2.0, 0.7
COMMON = dict(num_inference_steps=2, height=32, width=32, output_type="latent", max_sequence_length=32)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def check_two_calls(pipe, heads: str = HEADS, **kwargs) -> torch.Tensor:
    """Two PAG calls (two blocks) equal the hand-combined reference on the same pipeline; returns the result."""
    with reference_pag(pipe, heads, S, U, positive_embeds(pipe, "a cat", max_sequence_length=32)):
        expected = pipe("a cat", **COMMON, **kwargs, generator=gen()).images
    for _ in range(2):
        with head_pag(pipe, pag_heads=heads, pag_scale=S, pag_identity_weight=U):
            got = pipe("a cat", **COMMON, **kwargs, generator=gen()).images
        torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)
    return expected


def lora(seed: int) -> LoraConfig:
    torch.manual_seed(seed)
    return LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


@torch.no_grad()
def test_lora_active_set_adapters_and_fused():
    pipe = StableDiffusion3Pipeline(**tiny_sd3_components())
    pipe.set_progress_bar_config(disable=True)
    cfg = dict(guidance_scale=4.0)
    plain = pipe("a cat", **COMMON, **cfg, generator=gen()).images
    pipe.transformer.add_adapter(lora(1), adapter_name="a")
    pipe.transformer.add_adapter(lora(2), adapter_name="b")
    pipe.transformer.set_adapters(["a"])
    active = check_two_calls(pipe, **cfg)
    assert not torch.allclose(active, plain, atol=1e-4)  # the adapter acts
    pipe.transformer.set_adapters(["a", "b"], weights=[0.5, 1.0])
    mixed = check_two_calls(pipe, **cfg)
    assert not torch.allclose(mixed, active, atol=1e-4)
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=["a", "b"])
    fused = check_two_calls(pipe, **cfg)
    torch.testing.assert_close(fused, mixed, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_fused_qkv_projections(family):
    if family == "sd3":
        pipe, cfg = StableDiffusion3Pipeline(**tiny_sd3_components()), dict(guidance_scale=4.0)
    else:
        pipe, cfg = FluxPipeline(**tiny_flux_components()), dict(negative_prompt="blur", true_cfg_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    unfused = check_two_calls(pipe, **cfg)
    pipe.transformer.fuse_qkv_projections()
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U):
        for _ in range(2):
            got = pipe("a cat", **COMMON, **cfg, generator=gen()).images
            torch.testing.assert_close(got, unfused, atol=5e-5, rtol=0)
    assert pipe.transformer.transformer_blocks[1].attn.fused_projections  # one QKV projection now


def tiny_image_encoder() -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    torch.manual_seed(11)
    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16,
    )  # fmt: skip
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config).eval(), processor


@torch.no_grad()
def test_flux_ip_adapter_with_an_image_encoder():
    """The adapter's processors sit on the double-stream layers 0-1; the heads perturbed here are in the single-stream
    layers after them (the reference oracle has no IP-Adapter processor), so the per-row image embeddings must reach
    the perturbed rows through the shared prefix. Perturbing inside the adapter's own attention call is checked in
    `test_composition.test_flux_ip_adapter_with_pag` (u = 0 is exact, batched equals sequential)."""
    from test_composition import add_tiny_ip_adapter

    encoder, processor = tiny_image_encoder()
    pipe = FluxPipeline(**tiny_flux_components(), image_encoder=encoder, feature_extractor=processor)
    pipe.set_progress_bar_config(disable=True)
    add_tiny_ip_adapter(pipe.transformer)
    red, blue = Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (20, 40, 230))
    kwargs = dict(ip_adapter_image=red, negative_ip_adapter_image=blue, negative_prompt="blur", true_cfg_scale=2.0)
    result = check_two_calls(pipe, heads="2, 3.1", **kwargs)
    other = pipe("a cat", **COMMON, **{**kwargs, "ip_adapter_image": blue}, generator=gen()).images
    assert not torch.allclose(result, other, atol=1e-4)  # the image acts
