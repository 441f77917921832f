"""Model layouts: how the paper's layer numbering maps onto the blocks and attention modules of each family."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch import nn


FAMILIES = ("sd3", "flux")


@dataclass
class TransformerLayout:
    r"""
    The layers of a supported transformer, numbered as in the paper.

    Args:
        family (`str`): `"sd3"` (SD3, SD3.5) or `"flux"` (FLUX.1).
        blocks (`list[nn.Module]`): The block of every layer, in order.
        attentions (`list[list[nn.Module]]`): The self-attention modules of every layer (SD3.5 dual-attention
            blocks have two: `attn` and the image-only `attn2`).
        num_heads (`int`): Heads per attention module.
        text_first (`bool`): `True` when the joint sequence is `[text, image]` (FLUX), `False` for `[image, text]`.
        num_double_blocks (`int`): FLUX double-stream blocks (layers below it); equals `num_layers` on SD3.
    """

    family: str
    blocks: list[nn.Module]
    attentions: list[list[nn.Module]]
    num_heads: int
    text_first: bool
    num_double_blocks: int

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_kind(self, layer: int) -> str:
        """`"joint"` for SD3 blocks, `"double"` / `"single"` for FLUX blocks."""
        if self.family == "sd3":
            return "joint"
        return "double" if layer < self.num_double_blocks else "single"


def describe_transformer(transformer: nn.Module) -> TransformerLayout:
    """
    Describe a diffusers transformer as numbered layers.

    Args:
        transformer (`nn.Module`): An `SD3Transformer2DModel` or `FluxTransformer2DModel` (possibly compiled or
            wrapped by accelerate hooks).

    Raises:
        `ValueError`: for an unknown model family, naming the class and the supported ones.
    """
    model = getattr(transformer, "_orig_mod", transformer)
    if isinstance(model, SD3Transformer2DModel):
        blocks = list(model.transformer_blocks)
        attentions = [[m for m in (block.attn, getattr(block, "attn2", None)) if m is not None] for block in blocks]
        return TransformerLayout("sd3", blocks, attentions, blocks[0].attn.heads, False, len(blocks))
    if isinstance(model, FluxTransformer2DModel):
        double = list(model.transformer_blocks)
        single = list(model.single_transformer_blocks)
        blocks = double + single
        attentions = [[block.attn] for block in blocks]
        return TransformerLayout("flux", blocks, attentions, blocks[0].attn.heads, True, len(double))
    raise ValueError(
        f"Unknown model family: {type(model).__name__} is not supported; head-level PAG supports "
        "SD3Transformer2DModel (Stable Diffusion 3 / 3.5) and FluxTransformer2DModel (FLUX.1)."
    )
