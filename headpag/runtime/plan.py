"""
The compiled plan of head-PAG calls and the context variable that activates it.

The hooks that `hooks.py` registers on a transformer do nothing unless the current context (thread, task) holds an
[`Activation`] for that transformer. So other threads, and other pipelines sharing the same modules, run the stock
model while a head-PAG call is under way. An activation pairs the immutable [`CallPlan`] with the mutable
[`~runtime.state.CallState`] of one call; activations nest, and each hook looks up the innermost one for its own
transformer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..guidance.heads import HeadSet
from ..guidance.plan import PerturbationPlan
from ..guidance.softpag import Perturbation
from .layout import TransformerLayout
from .state import CallState


@dataclass(frozen=True)
class PerturbedCall:
    r"""
    What one transformer call does with PAG: which rows hold conditional predictions and the PAG scale of this step.

    Args:
        rows (`list[int]`): Conditional rows of the call's batch; each gets one perturbed copy.
        scale (`float`): The PAG scale `s` of this step (> 0).
        in_place (`bool`, defaults to `False`): Perturb the call's own rows and return `v_p` as its output, with no
            clean rows and no PAG term (a guider that combines the predictions itself runs such a call).
    """

    rows: list[int]
    scale: float = 1.0
    in_place: bool = False


# `decide(call_kwargs, state) -> PerturbedCall | None`: the caller's policy (the pipeline family's, a guider's, a
# search's); `None` leaves the call alone (unconditional, skip-layer or out-of-interval calls).
Decide = Callable[[dict[str, Any], CallState], "PerturbedCall | None"]


class CallPlan:
    r"""
    Everything a head-PAG call needs, built once before the call and never changed by it.

    Args:
        layout ([`TransformerLayout`]): The transformer's layers.
        head_sets (`Sequence[HeadSet]`): Resolved head sets: one for every perturbed row, or one per image.
        perturbation ([`Perturbation`]): Identity weight, scope, target.
        decide (`Callable`): The caller's policy (see [`PerturbedCall`]).
        share_prefix (`bool`): Compute the blocks before the first perturbed layer once.
        sequential (`bool`): Run the perturbed rows as a second transformer call.
        has_caches (`bool`, defaults to `False`): The transformer carries diffusers caching hooks (the sequential
            perturbed call then gets a cache context of its own, and a cache may skip attention calls).
    """

    def __init__(
        self,
        layout: TransformerLayout,
        head_sets: Sequence[HeadSet],
        perturbation: Perturbation,
        decide: Decide,
        share_prefix: bool = True,
        sequential: bool = False,
        has_caches: bool = False,
    ):
        self.layout = layout
        self.model = layout.model
        self.head_sets = list(head_sets)
        self.perturbation = perturbation
        self.decide = decide
        self.sequential = sequential
        self.has_caches = has_caches
        first = min((layer for hs in self.head_sets for layer in hs.layers()), default=0)
        self.prefix_end = first if share_prefix else 0
        self.perturbed_layers = frozenset(layer for hs in self.head_sets for layer in hs.layers())
        self._batch_plans: dict[tuple[int, int], PerturbationPlan] = {}

    def head_sets_for(self, count: int) -> list[HeadSet]:
        """One head set per perturbed row; raises when the call's images and the head sets do not match."""
        if len(self.head_sets) == 1:
            return self.head_sets * count
        if len(self.head_sets) != count:
            raise ValueError(
                f"pag_heads has {len(self.head_sets)} head sets but the call generates {count} images; "
                "pass one head set, or one per image (prompts x num_images_per_prompt)."
            )
        return self.head_sets

    def batch_plan(self, first_row: int, count: int) -> PerturbationPlan:
        """The row-wise perturbation of rows `[first_row, first_row + count)`, built once per shape."""
        key = (first_row, count)
        if key not in self._batch_plans:
            rows = range(first_row, first_row + count)
            self._batch_plans[key] = PerturbationPlan(
                rows, self.head_sets_for(count), self.perturbation, self.layout.num_heads
            )
        return self._batch_plans[key]

    def attention_calls(self, layers) -> int:
        """How many attention modules must perturb rows in one transformer call that perturbs `layers`."""
        return sum(len(self.layout.attentions[layer]) for layer in layers)


@dataclass(frozen=True)
class Activation:
    r"""
    One entry of the current context's activations (innermost first, through `parent`).

    Args:
        model (`torch.nn.Module`): The transformer it applies to.
        plan ([`CallPlan`], *optional*): `None`: calls of `model` run stock (a block with `pag_scale=0`).
        state ([`CallState`], *optional*): `None` with a plan: the plan is *held*, not running; a transformer call
            then raises `held` (a `head_pag` block outside its pipeline's denoising loop).
        held (`str`): The error message of a held plan.
        marked (`bool`): Set by the transformer hook for the one call of a marked input (see `hooks.mark_input`);
            such an entry counts only while its call runs.
        parent ([`Activation`], *optional*): The enclosing activation.
    """

    model: torch.nn.Module
    plan: CallPlan | None
    state: CallState | None = None
    held: str = ""
    marked: bool = False
    parent: Activation | None = None


_ACTIVE: contextvars.ContextVar[Activation | None] = contextvars.ContextVar("headpag_activation", default=None)


def activation_for(model: torch.nn.Module, start: Activation | None | bool = True) -> Activation | None:
    """
    The innermost activation of the current context for `model` (searching from `start`, by default the innermost
    of all), or `None`. A marked entry whose call is over is skipped.
    """
    entry = _ACTIVE.get() if start is True else start
    while entry is not None and (entry.model is not model or (entry.marked and entry.state.call is None)):
        entry = entry.parent
    return entry


def activation_with_scheduler(scheduler: Any) -> Activation | None:
    """The innermost running activation of the current context whose state adds its term at `scheduler.step`."""
    entry = _ACTIVE.get()
    while entry is not None and (entry.state is None or entry.state.scheduler is not scheduler):
        entry = entry.parent
    return entry


@contextlib.contextmanager
def activated(
    plan: CallPlan | None,
    state: CallState | None = None,
    model: torch.nn.Module | None = None,
    held: str = "",
) -> Iterator[CallState | None]:
    r"""
    Activate `plan` for `plan.model` (or `model`) in the current context for a `with` block (nests; restored on
    exit, also after an exception). Yields the state (a fresh [`CallState`] unless given or held).

    Args:
        plan ([`CallPlan`], *optional*): The plan; `None` makes calls of `model` run stock inside the block.
        state ([`CallState`], *optional*): The call's state.
        model (`torch.nn.Module`, *optional*): The transformer, when `plan` is `None`.
        held (`str`, defaults to `""`): Hold the plan instead of running it: any transformer call raises this message.
    """
    if state is None and plan is not None and not held:
        state = CallState()
    entry = Activation(plan.model if plan is not None else model, plan, state, held, parent=_ACTIVE.get())
    token = _ACTIVE.set(entry)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)
