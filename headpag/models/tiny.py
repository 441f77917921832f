"""
Tiny random-weight SD3 / SD3.5-like / FLUX components, built fully offline (tokenizers in memory).

They make noise images, but every code path of the real models runs: tests, `--model tiny-sd3` in the CLI and the UI,
and benchmarks use them. Weights are seeded, so outputs are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)


TINY_MODELS = ("tiny-sd3", "tiny-sd35", "tiny-flux")


def _sharpen(model: torch.nn.Module, factor: float = 3.0) -> None:
    """Scale q/k projections so that random heads attend distinctly (random init is near-uniform)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in ("to_q.", "to_k.", "add_q_proj.", "add_k_proj.")) and p.ndim == 2:
                p.mul_(factor)


def tiny_sd3_transformer(
    num_layers: int = 4,
    num_heads: int = 4,
    head_dim: int = 8,
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
    seed: int = 0,
    sample_size: int = 32,
    in_channels: int = 4,
) -> SD3Transformer2DModel:
    """A tiny `SD3Transformer2DModel`; `qk_norm="rms_norm"` and `dual_attention_layers` give an SD3.5-like one."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=in_channels,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=32,
        caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=64,
        out_channels=in_channels,
        pos_embed_max_size=96,
        qk_norm=qk_norm,
        dual_attention_layers=tuple(dual_attention_layers),
    )
    _sharpen(model)
    return model.eval()


def tiny_flux_transformer(
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    seed: int = 0,
    in_channels: int = 16,
) -> FluxTransformer2DModel:
    """
    A tiny guidance-distilled `FluxTransformer2DModel` (4 latent channels x 2x2 packing); `in_channels` 32 for the
    Control pipelines, 48 for Fill (the extra channels carry the condition; the output stays 16).
    """
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8) if head_dim == 16 else (head_dim // 4, head_dim // 4, head_dim // 2),
    )
    _sharpen(model)
    return model.eval()


def _clip_tokenizer() -> CLIPTokenizer:
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_t5_tokenizer(words: Sequence[str] = ()) -> T5Tokenizer:
    """A Unigram T5 tokenizer built in memory: 56 pieces (letters and word starts), plus one piece per word of
    `words`, which then tokenize as one token each."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in letters] + [("\u2581" + c, -2.5) for c in letters]
    vocab += [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


def _t5_config() -> T5Config:
    return T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
        dropout_rate=0.0,
    )


def _vae(seed: int, latent_channels: int = 4) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.5035,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def tiny_sd3_components(seed: int = 0, latent_channels: int = 4, **transformer_kwargs: Any) -> dict[str, Any]:
    """
    Components for any `StableDiffusion3Pipeline` subclass; `transformer_kwargs` go to the transformer.
    `latent_channels=16` (SD3's own) for the inpainting pipeline, which requires it.
    """
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(_clip_config()).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config()).eval()
    text_encoder_3 = T5EncoderModel(_t5_config()).eval()
    return {
        "transformer": tiny_sd3_transformer(seed=seed, in_channels=latent_channels, **transformer_kwargs),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": _vae(seed + 2, latent_channels),
        "text_encoder": text_encoder,
        "tokenizer": _clip_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": _clip_tokenizer(),
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tiny_t5_tokenizer(),
    }


def tiny_flux_components(seed: int = 0, **transformer_kwargs: Any) -> dict[str, Any]:
    """Components for any `FluxPipeline` subclass; `transformer_kwargs` go to the transformer."""
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config()).eval()
    text_encoder_2 = T5EncoderModel(_t5_config()).eval()
    return {
        "transformer": tiny_flux_transformer(seed=seed, **transformer_kwargs),
        "scheduler": FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        ),
        "vae": _vae(seed + 2),
        "text_encoder": text_encoder,
        "tokenizer": _clip_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tiny_t5_tokenizer(),
    }


def tiny_components(name: str, seed: int = 0) -> tuple[str, dict[str, Any]]:
    """`(family, components)` for one of `TINY_MODELS`."""
    if name == "tiny-sd3":
        return "sd3", tiny_sd3_components(seed)
    if name == "tiny-sd35":
        return "sd3", tiny_sd3_components(seed, qk_norm="rms_norm", dual_attention_layers=(0, 1))
    if name == "tiny-flux":
        return "flux", tiny_flux_components(seed)
    raise ValueError(f"Unknown tiny model {name!r}; available: {', '.join(TINY_MODELS)}.")
