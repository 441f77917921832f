"""
The networks of the FLUX sibling (`headpag-shapes-flux`): a word-level T5 tokenizer, a small frozen T5 encoder with
hand-set weights, a small frozen CLIP text encoder for the pooled vector, and a small `FluxTransformer2DModel`
(4 double-stream + 8 single-stream blocks × 8 heads; 144 image tokens at 96 px). The VAE and the judge are the SD3
testbed's.

FLUX reads the prompt from T5 only (CLIP gives one pooled vector), and `FluxPipeline` pads T5 to
`max_sequence_length` (default 512) with no attention mask. The T5 is the testbed's windowed T5
([`~headpag.testbed.t5`]): each output holds its word and the three before it, and every pad more than three tokens
after `</s>` is exactly zero, so training uses one zero token standing for a random number of pads
([`~headpag.testbed.t5.multiplicity_bias`]) and the model serves every `max_sequence_length` that leaves at least one
zero pad (the prompt's words + 5: 18 for the longest grammar prompt) at the cost of ~20 text tokens instead of 512.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer

from .model import CLIP_WIDTH, build_tokenizer, clip_config
from .t5 import T5_WINDOW, build_t5, build_t5_tokenizer, content_length, multiplicity_bias


__all__ = ["PAD_TOKENS", "T5_WINDOW", "T5_WIDTH", "build_flux_transformer", "build_text_stack", "content_length",
           "multiplicity_bias"]  # fmt: skip


T5_WIDTH = 64
PAD_TOKENS = 512  # stock FluxPipeline's default max_sequence_length
TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels packed 2×2
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=16,
    num_attention_heads=8,
    joint_attention_dim=T5_WIDTH,
    pooled_projection_dim=CLIP_WIDTH,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)


def build_clip(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    """A 2-layer CLIP text encoder with seeded random weights: its pooled output is FLUX's `pooled_projections`."""
    torch.manual_seed(seed)
    return CLIPTextModel(clip_config(tokenizer)).eval().requires_grad_(False)


def build_flux_transformer(seed: int) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TRANSFORMER)


def build_text_stack(seed: int) -> dict:
    """The four text components of the FLUX folder (`tokenizer`, `text_encoder`, `tokenizer_2`, `text_encoder_2`)."""
    clip_tokenizer, t5_tokenizer = build_tokenizer(), build_t5_tokenizer()
    return {
        "tokenizer": clip_tokenizer,
        "text_encoder": build_clip(clip_tokenizer, seed),
        "tokenizer_2": t5_tokenizer,
        "text_encoder_2": build_t5(t5_tokenizer, seed + 1, T5_WIDTH),
    }
