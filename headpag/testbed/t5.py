"""
The testbed's windowed T5: a small frozen T5 encoder with hand-set attention over a word-level tokenizer, and the
key bias that lets training run on a prompt's few T5 tokens instead of the hundreds of pads a pipeline feeds.

- One layer, three heads; the queries are zero, so each head's attention is its relative-position bias alone, which
  puts all the weight on exactly one earlier token (1, 2 or 3 back; a token with none looks at itself).
- The `<pad>` embedding is zero, and T5's RMS norms, bias-free projections and ReLU keep zero at zero.

So a word's output holds it and the three words before it (the word order a transformer needs to bind a colour to
its shape, or to read "at the top left"), and every pad more than three tokens after `</s>` is exactly the zero
vector. Pipelines pad T5 to `max_sequence_length` without an attention mask (`StableDiffusion3Pipeline` to 256,
`FluxPipeline` to 512); identical text tokens are interchangeable keys, because neither model gives text tokens
distinct positions (SD3 adds none, FLUX gives them all rotary position zero), so `n` zero pads act as one key whose
logit carries `+log(n)` ([`multiplicity_bias`]). Both testbed models use this T5: FLUX as its only per-token text,
SD3 beside its two CLIP encoders.
"""

from __future__ import annotations

import math

import torch
from torch.overrides import TorchFunctionMode
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from ..models.tiny import tiny_t5_tokenizer
from .data import all_prompts


T5_WINDOW = 3  # how many earlier tokens a T5 output holds (one head each)
_BLOCKED = -1.0e4  # a relative-position bias whose softmax weight is exactly 0 in float32 (exp underflows)
_FALLBACK = -200.0  # self: weight exactly 0 when the head's earlier token exists, 1 when it does not


def build_t5_tokenizer() -> T5Tokenizer:
    """A Unigram T5 tokenizer in which every grammar word is one piece (other text falls back to letters)."""
    return tiny_t5_tokenizer(words=sorted({w for p in all_prompts() for w in p.split()}))


def build_t5(tokenizer: T5Tokenizer, seed: int, width: int) -> T5EncoderModel:
    r"""
    The windowed T5 of the module docstring: random embeddings, values, outputs and feed-forward; set biases.

    Args:
        tokenizer (`T5Tokenizer`): Its vocabulary and special tokens.
        seed (`int`): Seed of the random weights.
        width (`int`): `d_model`, the transformer's `joint_attention_dim`.
    """
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 2,
        d_ff=2 * width,
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


def content_length(input_ids: torch.Tensor, pad_token_id: int = 0) -> torch.Tensor:
    """
    Per row, how many leading T5 outputs can be non-zero: the tokens up to `</s>` and the `T5_WINDOW` pads after it
    (every later pad is exactly zero).
    """
    real = (input_ids != pad_token_id).sum(-1)
    return torch.clamp(real + T5_WINDOW, max=input_ids.shape[-1])


def multiplicity_bias(
    lengths: torch.Tensor, text_tokens: int, counts: torch.Tensor, image_tokens: int, leading: int = 0
) -> torch.Tensor:
    r"""
    The additive key bias (B, 1, 1, keys) that makes a compact T5 sequence act like a long padded one.

    Args:
        lengths (`torch.Tensor`): Per row, its content length ([`content_length`]); token `lengths[b]` is a zero pad
            that stands for `counts[b]` pads, later ones are masked out (`-inf`).
        text_tokens (`int`): The compact T5 length (at least `max(lengths) + 1`).
        counts (`torch.Tensor`): Per row, how many zero pads the sequence stands for (≥ 1).
        image_tokens (`int`): Keys after the T5 tokens (FLUX's joint order is `[text, image]`: its image tokens).
        leading (`int`): Keys before the T5 tokens (SD3's order is `[image, CLIP, T5]`: image and CLIP tokens).
    """
    if int(lengths.max()) >= text_tokens:
        longest = int(lengths.max())
        raise ValueError(f"text_tokens={text_tokens} leaves no zero pad after a content length of {longest}")
    position = torch.arange(text_tokens).unsqueeze(0)
    bias = torch.zeros(len(lengths), leading + text_tokens + image_tokens)
    text = bias[:, leading : leading + text_tokens]
    text[position > lengths.unsqueeze(1)] = -math.inf
    text[torch.arange(len(lengths)), lengths] = counts.double().log().float()
    return bias.view(len(lengths), 1, 1, -1)


class KeyBias(TorchFunctionMode):
    r"""
    Inside this mode, every `scaled_dot_product_attention` call gets `bias` as its additive mask: for attention
    processors that take no mask (SD3's `JointAttnProcessor2_0` ignores `attention_mask`).

    Args:
        bias (`torch.Tensor`): (B, 1, 1, keys), as [`multiplicity_bias`] makes it.
    """

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = bias

    def mask(self, key: torch.Tensor) -> torch.Tensor:
        if self.bias.shape[-1] != key.shape[-2]:
            raise ValueError(f"The key bias covers {self.bias.shape[-1]} keys; attention has {key.shape[-2]}.")
        return self.bias.to(device=key.device, dtype=key.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.scaled_dot_product_attention:
            key = args[1] if len(args) > 1 else kwargs["key"]
            kwargs["attn_mask"] = self.mask(key)
        return func(*args, **kwargs)
