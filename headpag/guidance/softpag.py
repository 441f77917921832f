"""SoftPAG maths on attention outputs, without the L x L attention map.

For a selected head, SoftPAG replaces the attention map `A` by `(1 - u) A + u T` for a target map `T`. Because the
output is linear in the map, `((1 - u) A + u T) V = (1 - u) SDPA(Q, K, V) + u T V`, and `T V` is cheap for every
target used here:

| target        | `T`                                               | `T V`                                     |
|---------------|---------------------------------------------------|-------------------------------------------|
| `identity`    | `I` (PAG, [arXiv 2403.17377](https://huggingface.co/papers/2403.17377)) | `V`                  |
| `uniform`     | `1/N` everywhere (SoftUG)                         | mean of `V` over keys                     |
| `query_mean`  | `softmax(q_mean K^T / sqrt(d))` (SoftSEG's limit) | attention of the single mean query        |

With the `"image"` identity scope (diffusers' `PAGJointAttnProcessor2_0`), image queries get the softmax of their
own logit and the image-text logits (every other image key masked), and text queries keep `A`. HeadHunter / SoftPAG:
[arXiv 2506.10978](https://huggingface.co/papers/2506.10978).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


SCOPES = ("joint", "image")
TARGETS = ("identity", "uniform", "query_mean")


@dataclass(frozen=True)
class Perturbation:
    r"""
    How a selected head is perturbed.

    Args:
        identity_weight (`float`, defaults to `1.0`):
            SoftPAG's `u` in `[0, 1]`: `A <- (1 - u) A + u T`. `u = 1` is PAG, `u = 0` leaves the head untouched.
            The paper's general-quality search uses 0.25; 0.5 is a good trade-off after a search with `u = 1`.
        scope (`str`, defaults to `"joint"`):
            `"joint"`: the identity spans the whole joint `[image, text]` sequence (the paper's). `"image"`:
            diffusers-compatible, image queries see themselves and all text tokens, text queries are unchanged.
            Applies to the identity target only.
        target (`str`, defaults to `"identity"`):
            `"identity"` (PAG), `"uniform"` (SoftUG) or `"query_mean"` (SoftSEG's infinite-blur limit).
    """

    identity_weight: float = 1.0
    scope: str = "joint"
    target: str = "identity"

    def __post_init__(self):
        u = self.identity_weight
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not (0.0 <= float(u) <= 1.0) or math.isnan(u):
            raise ValueError(f"identity_weight (u) must be a number in [0, 1], got {u!r}.")
        object.__setattr__(self, "identity_weight", float(u))
        if self.scope not in SCOPES:
            raise ValueError(f"Unknown identity scope {self.scope!r}; allowed: {', '.join(map(repr, SCOPES))}.")
        if self.target not in TARGETS:
            raise ValueError(f"Unknown perturbation target {self.target!r}; allowed: {', '.join(map(repr, TARGETS))}.")


def target_output(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    target: str,
    scope: str,
    image: slice,
    text: slice,
) -> torch.Tensor:
    r"""
    `T V` for the target map `T`, for tensors in `(batch, heads, tokens, head_dim)` layout.

    Args:
        query, key, value (`torch.Tensor`): Joint-sequence projections, `(B, H, L, D)`, after qk-norm and RoPE.
        target (`str`): `"identity"`, `"uniform"` or `"query_mean"`.
        scope (`str`): `"joint"` or `"image"` (identity only).
        image (`slice`): Positions of the image tokens in the joint sequence.
        text (`slice`): Positions of the text tokens (empty for image-only attention).

    Returns:
        `torch.Tensor` broadcastable to `(B, H, L, D)`.
    """
    if target == "uniform":
        return value.mean(dim=2, keepdim=True)
    if target == "query_mean":
        q_mean = query.mean(dim=2, keepdim=True)
        return torch.nn.functional.scaled_dot_product_attention(q_mean, key, value)
    if scope == "joint":
        return value
    return image_scope_identity(query, key, value, image, text)


def image_scope_identity(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, image: slice, text: slice, attention=None
) -> torch.Tensor:
    r"""
    `T V` for diffusers' image-only identity: image query `i` attends to image key `i` and every text key; text
    queries keep the full attention (`attention`, the SDPA output, or recomputed when `None`).

    Costs an `(L_image x L_text)` product per head instead of the `L x L` map.
    """
    scale = 1.0 / math.sqrt(query.shape[-1])
    q_img, k_img, v_img = query[:, :, image], key[:, :, image], value[:, :, image]
    self_logit = (q_img * k_img).sum(-1, keepdim=True) * scale  # (B, H, Li, 1)
    if text.stop > text.start:
        k_txt, v_txt = key[:, :, text], value[:, :, text]
        text_logits = torch.matmul(q_img, k_txt.transpose(-1, -2)) * scale  # (B, H, Li, Lt)
        probs = torch.softmax(torch.cat([self_logit, text_logits], dim=-1).float(), dim=-1).to(value.dtype)
        out_img = probs[..., :1] * v_img + torch.matmul(probs[..., 1:], v_txt)
    else:
        out_img = v_img
    if attention is None:
        attention = torch.nn.functional.scaled_dot_product_attention(query, key, value)
    out = attention.clone()
    out[:, :, image] = out_img
    return out


def softpag(
    attention: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weights: torch.Tensor,
    perturbation: Perturbation,
    image: slice,
    text: slice,
) -> torch.Tensor:
    r"""
    Blend the attention output of each head towards its target: `out = (1 - w) SDPA + w T V`.

    Args:
        attention (`torch.Tensor`): `SDPA(Q, K, V)`, `(B, H, L, D)`.
        query, key, value (`torch.Tensor`): `(B, H, L, D)`.
        weights (`torch.Tensor`): `(B, H)`, the identity weight of every row and head (0 for untouched heads).
        perturbation ([`Perturbation`]): Target and scope.
        image, text (`slice`): Token positions of each modality in the joint sequence.

    Returns:
        `torch.Tensor`: `(B, H, L, D)`; heads with weight 0 are returned bit-for-bit unchanged.
    """
    if perturbation.target == "identity" and perturbation.scope == "image":
        target = image_scope_identity(query, key, value, image, text, attention=attention)
    else:
        target = target_output(query, key, value, perturbation.target, perturbation.scope, image, text)
    target = target.expand_as(attention)
    w = weights.to(attention.dtype)[:, :, None, None].expand_as(attention)
    return torch.lerp(attention, target, w)
