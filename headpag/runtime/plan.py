"""
The compiled plan of one head-PAG call and the context variable that activates it.

The hooks that `hooks.py` registers on a transformer do nothing unless the current context (thread, task) holds an
active [`CallPlan`] for that transformer. So other threads, and other pipelines sharing the same modules, run the
stock model while a head-PAG call is under way.
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


_ACTIVE: contextvars.ContextVar[CallPlan | None] = contextvars.ContextVar("headpag_active_plan", default=None)


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


# `decide(call_kwargs, cache_context_name) -> PerturbedCall | None`: the pipeline family's policy, given by
# `headpag.pipelines`; `None` leaves the call alone (unconditional, skip-layer or out-of-interval calls).
Decide = Callable[[dict[str, Any], "str | None"], "PerturbedCall | None"]


class CallPlan:
    r"""
    Everything a head-PAG call needs, built once when the call starts, plus the small state of its current step.

    Args:
        layout ([`TransformerLayout`]): The transformer's layers.
        head_sets (`Sequence[HeadSet]`): Resolved head sets: one for every perturbed row, or one per image.
        perturbation ([`Perturbation`]): Identity weight, scope, target.
        decide (`Callable`): The pipeline's policy (see [`PerturbedCall`]).
        share_prefix (`bool`): Compute the blocks before the first perturbed layer once.
        sequential (`bool`): Run the perturbed rows as a second transformer call.
        scheduler (*optional*): The scheduler whose `step` receives the PAG term `s (v_c - v_p)`.
        has_caches (`bool`, defaults to `False`): The transformer carries diffusers caching hooks (the sequential
            perturbed call then gets a cache context of its own).
    """

    def __init__(
        self,
        layout: TransformerLayout,
        head_sets: Sequence[HeadSet],
        perturbation: Perturbation,
        decide: Decide,
        share_prefix: bool = True,
        sequential: bool = False,
        scheduler: Any = None,
        has_caches: bool = False,
    ):
        self.layout = layout
        self.model = layout.model
        self.head_sets = list(head_sets)
        self.perturbation = perturbation
        self.decide = decide
        self.sequential = sequential
        self.scheduler = scheduler
        self.has_caches = has_caches
        self.cache_context: Any = None  # the pipeline's cache context of the transformer call under way
        first = min((layer for hs in self.head_sets for layer in hs.layers()), default=0)
        self.prefix_end = first if share_prefix else 0
        self.perturbed_layers = frozenset(layer for hs in self.head_sets for layer in hs.layers())
        self._batch_plans: dict[tuple[int, int], PerturbationPlan] = {}
        # State of the transformer call under way (reset after each call).
        self.batch: PerturbationPlan | None = None
        self.text_len: int = 0
        self.image_len: int = 0
        self.prefix_mode: tuple | None = None
        self.prefix_cache: tuple | None = None
        # The PAG term of the last conditional call, waiting for the scheduler step, and that call's `v_p`.
        self.pending: torch.Tensor | None = None
        self.perturbed: torch.Tensor | None = None

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

    def set_token_counts(self, kwargs: dict[str, Any]) -> None:
        """Image and text token counts of a transformer call (for the image identity scope)."""
        text = kwargs.get("encoder_hidden_states")
        self.text_len = 0 if text is None else text.shape[1]
        self.image_len = self.layout.image_tokens(kwargs["hidden_states"])

    def reset_call(self) -> None:
        self.batch = None
        self.prefix_mode = None
        self.prefix_cache = None

    def add_pending(self, model_output: torch.Tensor) -> torch.Tensor:
        """`model_output + s (v_c - v_p)` with the PAG term of this step (then cleared); unchanged when none."""
        term, self.pending = self.pending, None
        if term is None:
            return model_output
        if term.shape != model_output.shape:
            # FLUX Kontext: the transformer also predicts the reference-image tokens, which the pipeline drops.
            if term.ndim == 3 and term.shape[0] == model_output.shape[0] and term.shape[1] > model_output.shape[1]:
                term = term[:, : model_output.shape[1]]
            else:
                raise RuntimeError(
                    f"The PAG term has shape {tuple(term.shape)} but the scheduler got a prediction of shape "
                    f"{tuple(model_output.shape)}; this pipeline's layout is not supported by head_pag."
                )
        return model_output + term.to(model_output.dtype)


def active_plan() -> CallPlan | None:
    """The plan active in the current context, or `None`."""
    return _ACTIVE.get()


def activate(plan: CallPlan) -> contextvars.Token:
    """Make `plan` active in the current context until [`deactivate`] with the returned token (for guiders, whose
    `prepare_models` / `cleanup_models` pair cannot hold a `with` block)."""
    return _ACTIVE.set(plan)


def deactivate(token: contextvars.Token) -> None:
    _ACTIVE.reset(token)


@contextlib.contextmanager
def activated(plan: CallPlan) -> Iterator[CallPlan]:
    """Make `plan` the active plan of the current context for a `with` block (nests; restored on exit)."""
    token = _ACTIVE.set(plan)
    try:
        yield plan
    finally:
        _ACTIVE.reset(token)
        plan.reset_call()
        plan.pending = None
        plan.perturbed = None
