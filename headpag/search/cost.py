"""The cost of a search: transformer row-evaluations, images rendered and seconds, counted where batches form."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..runtime import describe_transformer


COST_KEYS = ("row_evals", "images", "seconds")


@dataclass
class Cost:
    r"""
    Work done by a search.

    Args:
        row_evals (`float`): Transformer row-evaluations: every row of every transformer forward (clean and perturbed
            rows alike), weighted by its image tokens relative to the configured size (1 at that size).
        images (`float`): Images rendered (a fraction when a batch's cost is shared between journal records).
        seconds (`float`): Wall time spent rendering and scoring.
    """

    row_evals: float = 0.0
    images: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.row_evals + other.row_evals, self.images + other.images, self.seconds + other.seconds)

    def __truediv__(self, n: float) -> Cost:
        return Cost(self.row_evals / n, self.images / n, self.seconds / n)

    def to_dict(self) -> dict[str, float]:
        images = round(self.images)
        return {
            "row_evals": round(self.row_evals, 6),
            "images": images if abs(self.images - images) < 1e-6 else round(self.images, 6),
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, doc: Any) -> Cost:
        """A cost from a (validated, see [`check_cost`]) record's `"cost"`; anything else counts as nothing."""
        if not isinstance(doc, dict) or check_cost(doc):
            return cls()
        return cls(*(float(doc.get(k, 0.0)) for k in COST_KEYS))


def check_cost(doc: Any) -> str | None:
    """Why a journal record's `"cost"` is invalid, or `None`: a JSON object of finite numbers >= 0."""
    if not isinstance(doc, dict):
        return f"cost must be a JSON object, got {type(doc).__name__}"
    for key in COST_KEYS:
        value = doc.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            return f"cost {key!r} must be a finite number >= 0, got {value!r}"
    return None


def reference_tokens(pipe, height: int, width: int) -> int:
    """Image tokens of one transformer row at `height` x `width` (SD3: latent patches; FLUX: packed tokens)."""
    layout = describe_transformer(pipe.transformer)
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    if layout.family == "sd3":
        patch = int(layout.model.config.patch_size)
        return max(1, (height // scale // patch) * (width // scale // patch))
    return max(1, (height // (scale * 2)) * (width // (scale * 2)))


class RowCounter:
    r"""
    Counts the transformer rows of the renders in its `with` block: a forward pre-hook on the transformer sees the
    rows of each call as the model computes them (head-PAG's transformer hooks run first, so a batched call counts
    its clean and perturbed rows, and the sequential perturbed call is a call of its own). Only calls from the
    thread that entered the block count (another user of the same model is not this search's work).

    Args:
        pipe: The pipeline.
        height, width (`int`): The configured size (a row of that size weighs 1).
    """

    def __init__(self, pipe, height: int, width: int):
        self.transformer = pipe.transformer
        self.layout = describe_transformer(pipe.transformer)
        self.reference = reference_tokens(pipe, height, width)
        self.rows = 0.0
        self._thread: int | None = None
        self._handles: list[Any] = []

    def _pre(self, module, args, kwargs):
        if threading.get_ident() != self._thread:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hidden, torch.Tensor):
            self.rows += hidden.shape[0] * self.layout.image_tokens(hidden) / self.reference
        return None

    def __enter__(self) -> RowCounter:
        self._thread = threading.get_ident()
        self._handles = [self.transformer.register_forward_pre_hook(self._pre, with_kwargs=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._thread = None
