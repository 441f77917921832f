"""
The argument tables of `runtime/layout.py` against the diffusers classes they describe: a diffusers release that adds,
removes or reorders an argument fails here instead of giving a wrong image.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from headpag.models.tiny import tiny_flux_transformer, tiny_sd3_transformer
from headpag.runtime.layout import BLOCKS, TRANSFORMER_ARGUMENTS, TRANSFORMER_BATCH_ARGUMENTS


def _parameters(function) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(function).parameters if name != "self")


@pytest.mark.parametrize("family, cls", [("sd3", SD3Transformer2DModel), ("flux", FluxTransformer2DModel)])
def test_transformer_tables_match_the_forward_signature(family, cls):
    assert TRANSFORMER_ARGUMENTS[family] == _parameters(cls.forward)
    assert set(TRANSFORMER_BATCH_ARGUMENTS[family]) <= set(TRANSFORMER_ARGUMENTS[family])


@pytest.mark.parametrize("cls", list(BLOCKS), ids=lambda c: c.__name__)
def test_block_tables_match_the_forward_signature(cls):
    metadata = BLOCKS[cls]
    assert metadata.arguments == _parameters(cls.forward)
    assert set(metadata.batch_arguments) <= set(metadata.arguments)


@pytest.mark.parametrize("kind", ["sd3", "flux-double", "flux-single"])
def test_block_outputs_are_in_the_tables_order(kind):
    """Each block returns `(encoder_hidden_states, hidden_states)`: told apart by their token counts."""
    torch.manual_seed(0)
    if kind == "sd3":
        block = tiny_sd3_transformer().transformer_blocks[0]
        rotary = {}
    else:
        model = tiny_flux_transformer()
        block = (model.transformer_blocks if kind == "flux-double" else model.single_transformer_blocks)[0]
        ids = torch.zeros(3 + 5, 3)
        rotary = {"image_rotary_emb": model.pos_embed(ids)}
    dim = block.attn.query_dim if hasattr(block.attn, "query_dim") else block.attn.to_q.in_features
    hidden, text, temb = torch.randn(2, 5, dim), torch.randn(2, 3, dim), torch.randn(2, dim)
    out = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, **rotary)
    names = BLOCKS[type(block)].outputs
    assert len(out) == len(names)
    shapes = dict(zip(names, (o.shape for o in out)))
    assert shapes == {"encoder_hidden_states": text.shape, "hidden_states": hidden.shape}
