"""
The networks of the FLUX sibling (`headpag-shapes-flux`): a word-level T5 tokenizer, a small frozen T5 encoder with
hand-set weights, a small frozen CLIP text encoder for the pooled vector, and a small `FluxTransformer2DModel`
(4 double-stream + 8 single-stream blocks × 8 heads; 144 image tokens at 96 px). The VAE and the judge are the SD3
testbed's.

FLUX reads the prompt from T5 only (CLIP gives one pooled vector), and `FluxPipeline` pads T5 to
`max_sequence_length` (default 512) with no attention mask, while the transformer gives every text token the same
rotary position (zero). The T5 here is made so that those pads cost nothing to train:

- one layer, three heads; the queries are zero, so each head's attention is its relative-position bias alone, which
  puts all the weight on exactly one earlier token (1, 2 or 3 back; a token with none looks at itself);
- the `<pad>` embedding is zero, and T5's RMS norms, bias-free projections and ReLU keep zero at zero.

So a word's output holds it and the three words before it (the word order the transformer needs to bind a colour to
its shape), and every pad more than three tokens after `</s>` is exactly the zero vector. Identical text tokens at
identical positions are interchangeable keys: `n` of them act as one key whose logit carries `+log(n)`
([`multiplicity_bias`]). Training uses one zero token standing for a random number of pads, so the model serves every
`max_sequence_length` that leaves at least one zero pad (the prompt's words + 5: 18 for the longest grammar prompt)
at the cost of ~20 text tokens instead of 512.
"""

from __future__ import annotations

import math

import torch
from diffusers import FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from ..models.tiny import tiny_t5_tokenizer
from .data import all_prompts
from .model import CLIP_WIDTH, build_tokenizer, clip_config


T5_WIDTH = 64
T5_WINDOW = 3  # how many earlier tokens a T5 output holds (one head each)
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
_BLOCKED = -1.0e4  # a relative-position bias whose softmax weight is exactly 0 in float32 (exp underflows)
_FALLBACK = -200.0  # self: weight exactly 0 when the head's earlier token exists, 1 when it does not


def build_t5_tokenizer() -> T5Tokenizer:
    """A Unigram T5 tokenizer in which every grammar word is one piece (other text falls back to letters)."""
    return tiny_t5_tokenizer(words=sorted({w for p in all_prompts() for w in p.split()}))


def build_t5(tokenizer: T5Tokenizer, seed: int) -> T5EncoderModel:
    """The windowed T5 of the module docstring: random embeddings, values, outputs and feed-forward; set biases."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_kv=T5_WIDTH // 2,
        d_ff=2 * T5_WIDTH,
        num_layers=1,
        num_heads=T5_WINDOW,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    model = T5EncoderModel(config)
    attention = model.encoder.block[0].layer[0].SelfAttention
    with torch.no_grad():
        model.shared.weight.normal_()
        model.shared.weight[tokenizer.pad_token_id] = 0
        attention.q.weight.zero_()
        bias = torch.full_like(attention.relative_attention_bias.weight, _BLOCKED)
        for head in range(T5_WINDOW):
            # bidirectional buckets: a key `d` tokens before the query (d < 8) is bucket d, the query itself bucket 0
            bias[head + 1, head] = 0.0
            bias[0, head] = _FALLBACK
        attention.relative_attention_bias.weight.copy_(bias)
    return model.eval().requires_grad_(False)


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
        "text_encoder_2": build_t5(t5_tokenizer, seed + 1),
    }


def content_length(input_ids: torch.Tensor, pad_token_id: int = 0) -> torch.Tensor:
    """
    Per row, how many leading T5 outputs can be non-zero: the tokens up to `</s>` and the `T5_WINDOW` pads after it
    (every later pad is exactly zero).
    """
    real = (input_ids != pad_token_id).sum(-1)
    return torch.clamp(real + T5_WINDOW, max=input_ids.shape[-1])


def multiplicity_bias(
    lengths: torch.Tensor, text_tokens: int, counts: torch.Tensor, image_tokens: int
) -> torch.Tensor:
    r"""
    The additive key bias (B, 1, 1, text + image) that makes a compact text sequence act like a long padded one.

    Args:
        lengths (`torch.Tensor`): Per row, its content length ([`content_length`]); token `lengths[b]` is a zero pad
            that stands for `counts[b]` pads, later ones are masked out (`-inf`).
        text_tokens (`int`): The compact text length (at least `max(lengths) + 1`).
        counts (`torch.Tensor`): Per row, how many zero pads the sequence stands for (≥ 1).
        image_tokens (`int`): Image tokens after the text (FLUX's joint order is `[text, image]`).
    """
    if int(lengths.max()) >= text_tokens:
        longest = int(lengths.max())
        raise ValueError(f"text_tokens={text_tokens} leaves no zero pad after a content length of {longest}")
    position = torch.arange(text_tokens).unsqueeze(0)
    bias = torch.zeros(len(lengths), text_tokens + image_tokens)
    text = bias[:, :text_tokens]
    text[position > lengths.unsqueeze(1)] = -math.inf
    text[torch.arange(len(lengths)), lengths] = counts.double().log().float()
    return bias.view(len(lengths), 1, 1, -1)
