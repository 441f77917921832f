"""
The state object of the reference processors: which plan the current transformer call perturbs, read by
[`~headpag.testing.processors`] and [`~headpag.testing.explicit`] (the production runtime keeps its own per-call state
in [`~headpag.runtime.state.CallState`]).
"""

from __future__ import annotations

import torch

from ..guidance.plan import PerturbationPlan
from ..guidance.softpag import softpag


class PerturbationState:
    """
    Mutable state shared by the processors of one model: the plan of the current transformer call (or `None`: no
    row is perturbed, processors compute the stock attention) and the text length of the joint sequence.
    """

    def __init__(self):
        self.plan: PerturbationPlan | None = None
        self.text_len: int | None = None

    def apply(
        self,
        layer: int,
        attention: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        image: slice,
        text: slice,
    ) -> torch.Tensor:
        """
        Apply the plan of `layer` to an SDPA output in `(B, H, L, D)` layout; returns `attention` itself when the
        layer is not perturbed in this call, so clean computations stay bit-for-bit identical.
        """
        plan = self.plan
        if plan is None:
            return attention
        entry = plan.layer_weights(layer, attention.device)
        if entry is None:
            return attention
        rows, weights = entry
        if plan.rows and max(plan.rows) >= attention.shape[0]:
            raise RuntimeError(
                f"Perturbation plan addresses batch row {max(plan.rows)} but layer {layer} got a batch of "
                f"{attention.shape[0]}."
            )
        blended = softpag(
            attention[rows], query[rows], key[rows], value[rows], weights, plan.perturbation, image, text
        )
        return attention.index_copy(0, rows, blended)
