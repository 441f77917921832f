"""One transformer call with perturbed rows, without a pipeline: for HeadHunter-style tooling, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..guidance.heads import HeadSet
from ..guidance.softpag import Perturbation
from .hooks import ensure_hooks
from .layout import describe_transformer
from .plan import CallPlan, PerturbedCall, activated


def perturbed_forward(
    transformer: torch.nn.Module,
    kwargs: dict[str, Any],
    rows: Sequence[int],
    head_sets: Sequence[HeadSet],
    perturbation: Perturbation | None = None,
    share_prefix: bool = True,
    sequential: bool = False,
) -> tuple[Any, torch.Tensor]:
    r"""
    Run `transformer(**kwargs)` with a perturbed copy of each of `rows`, through the same hooks as a pipeline call.

    Args:
        transformer (`nn.Module`): An SD3 or FLUX transformer.
        kwargs (`dict`): The call's keyword arguments.
        rows (`Sequence[int]`): For each perturbed copy, the row it copies.
        head_sets (`Sequence[HeadSet]`): Resolved head sets: one for all copies, or one per copy.
        perturbation ([`Perturbation`], *optional*): Identity weight, scope, target (PAG by default).
        share_prefix, sequential (`bool`): As in [`~headpag.head_pag`].

    Returns:
        `(output, perturbed)`: the clean output, exactly as the stock call gives it (up to batch-size effects of the
        kernels), and the perturbed sample, one row per copy.
    """
    layout = describe_transformer(transformer)
    plan = CallPlan(
        layout,
        head_sets,
        perturbation or Perturbation(),
        lambda call_kwargs, state: PerturbedCall(list(rows), 1.0),
        share_prefix=share_prefix,
        sequential=sequential,
    )
    ensure_hooks(plan)
    with activated(plan) as state:
        output = transformer(**kwargs)
        return output, state.perturbed
