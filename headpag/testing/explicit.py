"""
The explicit attention-map reference: materialise `A = softmax(Q K^T / sqrt(d))`, blend `(1 - u) A + u T` on the
selected heads and multiply by `V`, the way the official HeadHunter code does. Slow and memory-hungry (`B x H x L x L`)
on purpose; tests compare the fused processors against it and benchmarks measure what the fusion saves.
"""

from __future__ import annotations

import math

import torch

from ..guidance.softpag import Perturbation
from .state import PerturbationState


def target_map(
    attention_map: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    perturbation: Perturbation,
    image: slice,
    text: slice,
) -> torch.Tensor:
    """The `L x L` target map `T` of `perturbation`, broadcastable to `attention_map` `(B, H, L, L)`."""
    length = attention_map.shape[-1]
    device, dtype = attention_map.device, attention_map.dtype
    if perturbation.target == "uniform":
        return torch.full_like(attention_map, 1.0 / length)
    if perturbation.target == "query_mean":
        q_mean = query.mean(dim=2, keepdim=True)
        row = torch.softmax(q_mean @ key.transpose(-1, -2) / math.sqrt(query.shape[-1]), dim=-1)
        return row.expand_as(attention_map)
    eye = torch.eye(length, device=device, dtype=dtype)
    if perturbation.scope == "joint":
        return eye.expand_as(attention_map)
    # "image": image queries see themselves and all text keys; text rows keep A.
    logits = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    mask = torch.zeros(length, length, dtype=torch.bool, device=device)
    mask[image, image] = True
    mask &= ~torch.eye(length, dtype=torch.bool, device=device)
    masked = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)
    out = attention_map.clone()
    out[:, :, image] = masked[:, :, image]
    return out


def explicit_softpag(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weights: torch.Tensor,
    perturbation: Perturbation,
    image: slice,
    text: slice,
) -> torch.Tensor:
    """`((1 - w) A + w T) V` with every map materialised; `weights` is `(B, H)`."""
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    attention_map = torch.softmax(scores, dim=-1)
    target = target_map(attention_map, query, key, perturbation, image, text)
    w = weights.to(attention_map.dtype)[:, :, None, None]
    return ((1 - w) * attention_map + w * target) @ value


class ExplicitMapState(PerturbationState):
    """A [`PerturbationState`] that perturbs through [`explicit_softpag`] instead of the fused SDPA blend."""

    def apply(self, layer, attention, query, key, value, image, text):
        plan = self.plan
        entry = None if plan is None else plan.layer_weights(layer, attention.device)
        if entry is None:
            return attention
        rows, weights = entry
        out = explicit_softpag(query[rows], key[rows], value[rows], weights, plan.perturbation, image, text)
        return attention.index_copy(0, rows, out.to(attention.dtype))
