"""The perturbation plan: which rows of one transformer batch are perturbed, on which heads, and how."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .heads import HeadSet
from .softpag import Perturbation


class PerturbationPlan:
    r"""
    Row-wise perturbation of a batch: row `rows[i]` perturbs the heads of `head_sets[i]`.

    Different rows may carry different head sets (HeadHunter batches several candidates in one call); rows that are
    not listed are computed exactly like the unperturbed model.

    Args:
        rows (`Sequence[int]`): Batch rows that are perturbed.
        head_sets (`Sequence[HeadSet]`): One resolved head set per row in `rows`.
        perturbation ([`Perturbation`]): Identity weight, scope and target, shared by all rows.
        num_heads (`int`): Heads per layer of the model.
    """

    def __init__(self, rows: Sequence[int], head_sets: Sequence[HeadSet], perturbation: Perturbation, num_heads: int):
        if len(rows) != len(head_sets):
            raise ValueError(f"Got {len(rows)} perturbed rows but {len(head_sets)} head sets; they must match.")
        self.perturbation = perturbation
        self.num_heads = num_heads
        self.rows = list(rows)
        self.head_sets = list(head_sets)
        # layer -> (row positions in the batch, (P, H) weights); built once on CPU, moved per device on demand.
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        per_layer: dict[int, dict[int, list[int]]] = {}
        for row, hs in zip(self.rows, self.head_sets):
            for layer, heads in hs.heads_by_layer().items():
                per_layer.setdefault(layer, {})[row] = heads
        u = perturbation.identity_weight
        for layer, row_heads in per_layer.items():
            layer_rows = sorted(row_heads)
            weights = torch.zeros(len(layer_rows), num_heads, dtype=torch.float32)
            for i, row in enumerate(layer_rows):
                weights[i, row_heads[row]] = u
            self._layers[layer] = (torch.tensor(layer_rows, dtype=torch.long), weights)
        self._device_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def layers(self) -> list[int]:
        """The perturbed layers, in order."""
        return sorted(self._layers)

    def layer_weights(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(rows, weights)` for `layer` on `device`, or `None` when the layer is not perturbed."""
        if layer not in self._layers:
            return None
        key = (layer, device)
        if key not in self._device_cache:
            rows, weights = self._layers[layer]
            self._device_cache[key] = (rows.to(device), weights.to(device))
        return self._device_cache[key]
