"""Shared fixtures: tiny random transformers and pipelines, built in-process with fixed seeds."""

from __future__ import annotations

import os

import pytest
import torch


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

from headpag.models.tiny import tiny_flux_transformer, tiny_sd3_transformer  # noqa: E402


MODELS = ("sd3", "sd35", "flux")


def make_transformer(kind: str):
    if kind == "sd3":
        return tiny_sd3_transformer()
    if kind == "sd35":
        return tiny_sd3_transformer(qk_norm="rms_norm", dual_attention_layers=(0, 2))
    if kind == "flux":
        return tiny_flux_transformer(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    raise ValueError(kind)


def make_inputs(kind: str, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind in ("sd3", "sd35"):
        return dict(
            hidden_states=torch.randn(batch, 4, 16, 16, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, 12, 32, generator=g),
            pooled_projections=torch.randn(batch, 64, generator=g),
            return_dict=False,
        )
    return dict(
        hidden_states=torch.randn(batch, 64, 16, generator=g),
        timestep=torch.full((batch,), 0.5),
        guidance=torch.full((batch,), 3.5),
        encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        txt_ids=torch.zeros(8, 3),
        img_ids=torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1
        ).reshape(-1, 3),
        return_dict=False,
    )


@pytest.fixture(params=MODELS)
def model_kind(request):
    return request.param


@pytest.fixture
def transformer(model_kind):
    return make_transformer(model_kind)


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_tiny_clip_config(path):
    """A tiny open_clip model config (registered under the file's stem by `ClipScore`)."""
    import json

    path.write_text(json.dumps(TINY_CLIP))
    return path


def write_tiny_clip_checkpoint(folder, name: str = "tiny-clip", seed: int = 0):
    """`(config path, checkpoint path)` of a tiny open_clip model with random weights, built with open_clip itself:
    metrics refuse to run without weights, so tests pass this checkpoint explicitly."""
    import open_clip
    from safetensors.torch import save_file

    config = write_tiny_clip_config(folder / f"{name}.json")
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    checkpoint = folder / f"{name}.safetensors"
    save_file(model.state_dict(), checkpoint)
    return config, checkpoint
