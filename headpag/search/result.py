"""The result of a HeadHunter search: the selected heads in order, per-round scores and stages, and the cost."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..guidance import HeadSet
from .config import SearchConfig
from .strategies import RoundOutcome


Head = tuple[int, int]


@dataclass
class SearchResult:
    r"""
    Args:
        order (`list[tuple[int, int]]`): Heads in the order they were added.
        rounds (`list[dict]`): Per round: `{"scores": {(layer, head): mean score over the pairs it was scored on},
            "chosen": [...], "pairs_scored": {(layer, head): pairs}, "stages": [{"pairs": [...], "candidates":
            [...], "dropped": [...]}], "cost": {...}}` (one stage for the exhaustive strategy); the gradient
            strategy adds `"prefilter": {(layer, head): mean gradient}` over the whole pool.
        family, num_layers, num_heads: The model's.
        config ([`SearchConfig`]): The settings.
        provenance (`dict`): Output folder and model name.
        cost (`dict`): The work of the whole run, resumed parts included (what its journal holds):
            `{"row_evals", "images", "seconds"}` (see [`~search.cost.Cost`]).
    """

    order: list[Head]
    rounds: list[dict[str, Any]]
    family: str
    num_layers: int
    num_heads: int
    config: SearchConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)

    @property
    def selected(self) -> HeadSet:
        return HeadSet(self.order)

    def save_heads(self, path: str | os.PathLike) -> Path:
        """Save the selected heads as a head-set JSON file with the search settings as metadata."""
        return self.selected.save(
            path,
            model_family=self.family,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            recommended_scale=self.config.pag_scale,
            identity_weight=self.config.pag_identity_weight,
            provenance={"method": "HeadHunter", "order": [list(h) for h in self.order], **self.provenance},
        )


def stage_summary(outcome: RoundOutcome) -> list[dict[str, Any]]:
    """`[{"pairs", "candidates", "dropped"}]` per stage; the last stage drops nobody (its candidates are ranked)."""
    last = len(outcome.stages) - 1
    return [
        {"pairs": stage.pairs, "candidates": stage.candidates, "dropped": stage.dropped if s < last else []}
        for s, stage in enumerate(outcome.stages)
    ]
