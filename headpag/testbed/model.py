"""
The testbed's networks, built from configs: a word-level CLIP tokenizer for the grammar, two small frozen CLIP text
encoders, a small `AutoencoderKL` (96×96 → 24×24×4), a small `SD3Transformer2DModel` (10 joint blocks × 8 heads, 144
image tokens) and the judge CNN.

The shipped transformer is trained with the windowed T5 of [`~headpag.testbed.t5`] (`build_sd3_t5`) as the third text
encoder from its first step: the T5 tokens add each word with the three before it, so the transformer can read word
order (which colour goes with which shape, "at the top left"). Its pads past the window are exactly zero, and training
uses the prompt's T5 tokens and one zero pad standing for the rest.

An optional CLIP-only first stage (`Schedule.transformer_steps`, 0 by default) trains with a "null T5" instead: a
one-layer T5 encoder whose final norm has zero weight, so it outputs exactly the zeros that SD3 pipelines use when T5
is dropped. SD3 then feeds `max_sequence_length` (default 256) identical zero tokens, which act as one key whose logit
carries `+log(count)` ([`ZeroTokenMultiplicity`], exact to 1e-6): that stage trains on one zero token with a random
count in [1, 256]. It is off because it hurts: the CLIP tokens of "top left" and "bottom right" differ little, a model
that starts there learns to ignore direction words, and a later T5 stage did not undo it (`docs/testbed.md`).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from ..models.tiny import tiny_t5_tokenizer
from .data import ATTRIBUTES, IMAGE_SIZE, all_prompts
from .t5 import KeyBias, build_t5, build_t5_tokenizer


TEXT_TOKENS = 16  # CLIP tokenizer length: the longest prompt is 15 tokens with BOS/EOS
ZERO_TOKENS = 256  # stock StableDiffusion3Pipeline's default max_sequence_length
CLIP_WIDTH = 64
TRANSFORMER = dict(
    sample_size=24,
    patch_size=2,
    in_channels=4,
    num_layers=10,
    attention_head_dim=16,
    num_attention_heads=8,
    joint_attention_dim=2 * CLIP_WIDTH,
    caption_projection_dim=128,
    pooled_projection_dim=2 * CLIP_WIDTH,
    out_channels=4,
    pos_embed_max_size=12,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    mid_block_add_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def build_tokenizer() -> CLIPTokenizer:
    """
    A CLIP BPE tokenizer in which every grammar word is one token (any other text still tokenizes, by characters).

    The merges are learnt here, the BPE way (the most frequent adjacent pair over the grammar's words, merged until
    every word is one token), with ties broken by the pair itself: `tokenizers`' trainer breaks ties in no fixed
    order ("on" and "of" swapped ids between builds), which made training depend on the process it ran in.
    """
    words = sorted({w for p in all_prompts() for w in p.split()})
    pieces = [[*word[:-1], word[-1] + "</w>"] for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for word in pieces for pair in zip(word, word[1:]))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word in pieces:
            i = 0
            while i < len(word) - 1:
                if (word[i], word[i + 1]) == best:
                    word[i : i + 2] = [word[i] + word[i + 1]]
                i += 1
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_TOKENS)
    split = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"The testbed tokenizer splits grammar words: {split}")
    return tokenizer


def clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """The testbed's 2-layer CLIP text encoder over `tokenizer` (both models' encoders)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_WIDTH,
        intermediate_size=4 * CLIP_WIDTH,
        projection_dim=CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    """A 2-layer CLIP text encoder with seeded random weights (kept frozen: the transformer learns to read it)."""
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(clip_config(tokenizer)).eval().requires_grad_(False)


def build_null_t5() -> tuple[T5EncoderModel, T5Tokenizer]:
    """A T5 encoder that outputs zeros of width `joint_attention_dim` for any text, and a small T5 tokenizer."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64,
        d_model=TRANSFORMER["joint_attention_dim"],
        d_kv=8,
        d_ff=8,
        num_layers=1,
        num_heads=1,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    model = T5EncoderModel(config)
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.zero_()
    return model.eval().requires_grad_(False), tokenizer


def build_sd3_t5(seed: int) -> tuple[T5EncoderModel, T5Tokenizer]:
    """The shipped third text encoder: the windowed T5 of `headpag.testbed.t5` at the transformer's text width."""
    tokenizer = build_t5_tokenizer()
    return build_t5(tokenizer, seed, TRANSFORMER["joint_attention_dim"]), tokenizer


def build_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE, scaling_factor=1.0, shift_factor=0.0)


def build_transformer(seed: int) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TRANSFORMER)


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


class Judge(nn.Module):
    """A small CNN that reads every attribute of `data.ATTRIBUTES` from a 96×96 image in [0, 1]."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 128, 128):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            width = out
        side = IMAGE_SIZE // 16
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * side * side, self.feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, len(v)) for name, v in ATTRIBUTES.items()})

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 96, 96) in [0, 1] → (B, 128); other sizes are resized bilinearly."""
        if pixels.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            size = (IMAGE_SIZE, IMAGE_SIZE)
            pixels = nn.functional.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        return self.body(pixels * 2 - 1)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Log-probabilities per attribute."""
        features = self.features(pixels)
        return {name: head(features).log_softmax(-1) for name, head in self.heads.items()}


class ZeroTokenMultiplicity(KeyBias):
    r"""
    Inside this mode, SDPA gives the key at `index` the weight of `count` identical keys (logit `+ log(count)`).

    Args:
        index_from_end (`int`): Position of the one zero text token in the joint `[image, text]` sequence, counted
            from the end (1: the last).
        count (`int`): How many identical tokens it stands for.
    """

    def __init__(self, index_from_end: int = 1, count: int = ZERO_TOKENS):
        super().__init__(torch.zeros(0))
        self.index_from_end = index_from_end
        self.log_count = math.log(count)

    def mask(self, key: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros(key.shape[-2], dtype=key.dtype, device=key.device)
        bias[key.shape[-2] - self.index_from_end] = self.log_count
        return bias.view(1, 1, 1, -1)
