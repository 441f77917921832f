"""Model layouts: how the paper's layer numbering maps onto the blocks and attention modules of each family.

Block metadata (the order of a block's positional arguments, which of them carry one row per batch element, and the
order of its outputs) comes from one table per block class, like diffusers' `hooks._helpers.TransformerBlockRegistry`.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn


FAMILIES = ("sd3", "flux")


@dataclass(frozen=True)
class BlockMetadata:
    r"""
    How a transformer block is called.

    Args:
        arguments (`tuple[str, ...]`): The names of its forward's parameters, in order (to read positional calls).
        batch_arguments (`tuple[str, ...]`): The arguments that carry one row per batch element.
        outputs (`tuple[str, ...]`): The names of its outputs, in order.
    """

    arguments: tuple[str, ...]
    batch_arguments: tuple[str, ...] = ("hidden_states", "encoder_hidden_states", "temb")
    outputs: tuple[str, ...] = ("encoder_hidden_states", "hidden_states")


_FLUX_BLOCK = BlockMetadata(
    ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")
)
BLOCKS: dict[type, BlockMetadata] = {
    JointTransformerBlock: BlockMetadata(("hidden_states", "encoder_hidden_states", "temb", "joint_attention_kwargs")),
    FluxTransformerBlock: _FLUX_BLOCK,
    FluxSingleTransformerBlock: _FLUX_BLOCK,
}

# Transformer forward parameters, in order, and those that carry one row per batch element (lists of tensors and
# `joint_attention_kwargs` entries included: ControlNet residuals, IP-Adapter embeddings).
TRANSFORMER_ARGUMENTS = {
    "sd3": (
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "block_controlnet_hidden_states",
        "joint_attention_kwargs",
        "return_dict",
        "skip_layers",
    ),
    "flux": (
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
        "guidance",
        "joint_attention_kwargs",
        "controlnet_block_samples",
        "controlnet_single_block_samples",
        "return_dict",
        "controlnet_blocks_repeat",
    ),
}
TRANSFORMER_BATCH_ARGUMENTS = {
    "sd3": (
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "block_controlnet_hidden_states",
        "joint_attention_kwargs",
    ),
    "flux": (
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "guidance",
        "joint_attention_kwargs",
        "controlnet_block_samples",
        "controlnet_single_block_samples",
    ),
}


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
        model (`nn.Module`): The transformer itself (`_orig_mod` of a compiled one).
    """

    family: str
    blocks: list[nn.Module]
    attentions: list[list[nn.Module]]
    num_heads: int
    text_first: bool
    num_double_blocks: int
    model: nn.Module | None = None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_kind(self, layer: int) -> str:
        """`"joint"` for SD3 blocks, `"double"` / `"single"` for FLUX blocks."""
        if self.family == "sd3":
            return "joint"
        return "double" if layer < self.num_double_blocks else "single"

    def image_tokens(self, hidden_states) -> int:
        """The number of image tokens of a transformer input (SD3: latent patches; FLUX: packed tokens)."""
        if self.family == "sd3":
            patch = self.model.config.patch_size
            return (hidden_states.shape[-2] // patch) * (hidden_states.shape[-1] // patch)
        return hidden_states.shape[1]


def unwrap(transformer: nn.Module) -> nn.Module:
    """The module itself, looking through `torch.compile`'s `OptimizedModule`."""
    return getattr(transformer, "_orig_mod", transformer)


def describe_transformer(transformer: nn.Module) -> TransformerLayout:
    """
    Describe a diffusers transformer as numbered layers.

    Args:
        transformer (`nn.Module`): An `SD3Transformer2DModel` or `FluxTransformer2DModel` (possibly compiled or
            wrapped by accelerate hooks).

    Raises:
        `ValueError`: for an unknown model family, naming the class and the supported ones.
    """
    model = unwrap(transformer)
    if isinstance(model, SD3Transformer2DModel):
        blocks = list(model.transformer_blocks)
        attentions = [[m for m in (block.attn, getattr(block, "attn2", None)) if m is not None] for block in blocks]
        return TransformerLayout("sd3", blocks, attentions, blocks[0].attn.heads, False, len(blocks), model)
    if isinstance(model, FluxTransformer2DModel):
        double = list(model.transformer_blocks)
        single = list(model.single_transformer_blocks)
        blocks = double + single
        attentions = [[block.attn] for block in blocks]
        return TransformerLayout("flux", blocks, attentions, blocks[0].attn.heads, True, len(double), model)
    raise ValueError(
        f"Unknown model family: {type(model).__name__} is not supported; head-level PAG supports "
        "SD3Transformer2DModel (Stable Diffusion 3 / 3.5) and FluxTransformer2DModel (FLUX.1)."
    )
