"""
SoftPAG inside whatever attention the installed processor computes.

While a perturbed layer's attention module runs, a `TorchFunctionMode` (as diffusers'
`hooks.layer_skip.AttentionScoreSkipFunctionMode` does) catches `torch.nn.functional.scaled_dot_product_attention`,
lets it run, and blends the perturbed rows and heads of its output: `out = (1 - w) SDPA(Q, K, V) + w T(V)`. The user's
processor (IP-Adapter, a custom one), fused QKV projections and LoRA keep running for every row. An attention call
whose query and key lengths differ (an IP-Adapter's image attention) is left alone.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..guidance.softpag import softpag
from .plan import CallPlan
from .state import CallState


class SoftPAGAttentionMode(TorchFunctionMode):
    r"""
    Blends the SDPA outputs of one attention module for the rows and heads that the active plan perturbs.

    Args:
        plan ([`CallPlan`]): The running plan.
        state ([`CallState`]): Its state; `state.weights` holds the perturbed rows and weights of the current call.
        layer (`int`): The layer of the attention module.
        processor (`str`): The attention processor's class name (for error messages).
    """

    def __init__(self, plan: CallPlan, state: CallState, layer: int, processor: str):
        super().__init__()
        self.plan = plan
        self.state = state
        self.layer = layer
        self.processor = processor
        self.perturbed = 0  # self-attention calls that were perturbed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        query = kwargs["query"] if "query" in kwargs else args[0]
        key = kwargs["key"] if "key" in kwargs else args[1]
        value = kwargs["value"] if "value" in kwargs else args[2]
        if query.shape[-2] != key.shape[-2] or query.ndim != 4:
            return out  # cross-attention (IP-Adapter image tokens): not a self-attention map
        if out.shape[0] != self.state.batch_size:
            raise RuntimeError(
                f"Layer {self.layer}: the attention processor {self.processor} computed attention over "
                f"{out.shape[0]} row(s) of a batch of {self.state.batch_size}; head-level PAG needs the whole batch "
                "in one attention call (it cannot tell which rows a row-by-row processor is computing). Use a "
                "processor that attends over the whole batch at once, such as diffusers' default one."
            )
        rows, weights = self.state.weights[self.layer]
        p = self.plan.perturbation
        needs_tokens = p.target == "identity" and p.scope == "image"
        image, text = self.token_slices(query.shape[-2]) if needs_tokens else (slice(None), slice(0, 0))
        blended = softpag(
            out.index_select(0, rows),
            query.index_select(0, rows),
            key.index_select(0, rows),
            value.index_select(0, rows),
            weights,
            p,
            image,
            text,
        )
        self.perturbed += 1
        return out.index_copy(0, rows, blended.to(out.dtype))

    def token_slices(self, length: int) -> tuple[slice, slice]:
        """Image and text positions of a joint sequence (SD3 `[image, text]`, FLUX `[text, image]`)."""
        image_len, text_len = self.state.image_len, self.state.text_len
        if length == image_len:  # SD3.5's image-only attn2
            return slice(0, length), slice(length, length)
        if length != image_len + text_len:
            raise RuntimeError(
                f"Layer {self.layer}: attention over {length} tokens, expected {image_len} image + {text_len} text."
            )
        if self.plan.layout.text_first:
            return slice(text_len, length), slice(0, text_len)
        return slice(0, image_len), slice(image_len, length)
