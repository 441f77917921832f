"""
The mutable state of one activation of a head-PAG plan: the transformer call under way, the step, the PAG term.

A [`~runtime.plan.CallPlan`] is built once and never changes; everything that changes while a pipeline call runs
lives here, in one typed object per call, so that nothing of one call can leak into the next. The state also
*counts*: every step inside the PAG interval must receive exactly one PAG term, computed at that step from the
conditional rows, and a step that does not get one raises at that step (see [`CallState.complete_step`]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..guidance.plan import PerturbationPlan


@dataclass(frozen=True)
class PrefixShare:
    """Batched call: blocks before the first perturbed layer compute rows `[0, n)` and copy rows `index` after them."""

    n: int
    index: torch.Tensor


@dataclass(frozen=True)
class PrefixRecord:
    """Sequential clean call: keep rows `index` of the last prefix block's outputs (`outputs`, once recorded)."""

    index: torch.Tensor
    outputs: tuple | None = None


@dataclass(frozen=True)
class PrefixReplay:
    """Sequential perturbed call: skip the prefix blocks and hand over the recorded outputs."""

    outputs: tuple


PrefixMode = PrefixShare | PrefixRecord | PrefixReplay


@dataclass(frozen=True)
class PAGTerm:
    """`s (v_c - v_p)` of the conditional rows, computed at step `step`."""

    step: int
    value: torch.Tensor


@dataclass
class RunningCall:
    r"""
    The transformer call under way, between the transformer's pre-hook and its forward hook.

    Args:
        decision ([`~runtime.plan.PerturbedCall`]): What the policy decided for it.
        index (`torch.Tensor`, *optional*): The conditional rows that get perturbed copies.
        kwargs (`dict`, *optional*): The call's bound arguments (for the sequential perturbed call).
        token (*optional*): The context token of a marked in-place call's activation, reset by the forward hook.
        mark (*optional*): The mark of a marked in-place call (set `used` once it perturbed).
    """

    decision: Any
    index: torch.Tensor | None = None
    kwargs: dict[str, Any] | None = None
    token: Any = None
    mark: Any = None


@dataclass
class CallState:
    r"""
    What changes while one activation runs (one pipeline call, one guider batch, or one direct transformer call).

    Args:
        scales (`list[float]`, *optional*): The PAG scale of every step of the denoising loop (0 where the step is
            outside `pag_interval` or the adaptive scale reached 0). `None`: no steps are counted (direct calls).
        fresh_steps (`list[bool]`, *optional*): Which steps compute the perturbed branch (`pag_reuse`); on the others
            the term is the step's scale times the last computed `v_c - v_p` of this call. `None`: every step.
        scheduler (*optional*): The scheduler whose `step` adds the PAG term.
        explain (`Callable[[], str]`, *optional*): Adds what the caller knows (the pipeline's transformer and
            scheduler now) to the message of a missing PAG term.
    """

    scales: list[float] | None = None
    fresh_steps: list[bool] | None = None
    scheduler: Any = None
    explain: Callable[[], str] | None = None
    # The denoising step (counted by the scheduler's `step`) and what happened in it.
    step: int = 0
    conditional_done: bool = False
    step_timestep: torch.Tensor | None = None
    calls_in_step: int = 0
    pending: PAGTerm | None = None
    delta: torch.Tensor | None = None  # the last computed, unscaled `v_c - v_p`
    # The transformer call under way: the perturbed rows and per-head weights of each perturbed layer, on the call's
    # device (computed before the forward, outside any compiled graph), and the call's batch size.
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    batch_size: int = 0
    text_len: int = 0
    image_len: int = 0
    prefix: PrefixMode | None = None
    reentrant: bool = False
    attention_reached: int = 0
    call: RunningCall | None = None
    # The perturbed prediction `v_p` of the last perturbed call (for direct calls and the search).
    perturbed: torch.Tensor | None = None

    def expects_term(self, step: int) -> bool:
        """Whether step `step` lies in the PAG interval with a positive scale."""
        return self.scales is not None and step < len(self.scales) and self.scales[step] > 0

    def fresh(self) -> bool:
        """Whether the current step computes the perturbed branch (else it reuses the last `v_c - v_p`)."""
        steps = self.fresh_steps
        return steps is None or self.step >= len(steps) or steps[self.step]

    def scale(self) -> float:
        """The PAG scale of the current step (1 when no steps are counted)."""
        if self.scales is None:
            return 1.0
        return self.scales[self.step] if self.step < len(self.scales) else 0.0

    def begin_conditional(self, timestep: Any) -> bool:
        r"""
        Whether a transformer call is the first of its step (the conditional one: every SD3 / FLUX pipeline calls the
        transformer on the conditional prompt first, then on the negative prompt or the skip-layer branch).

        A later call of the same step returns `False`; one with another `timestep` while a PAG term is pending means
        that the step ended without the scheduler's `step` that adds the term, which raises.
        """
        if not self.conditional_done:
            self.conditional_done = True
            self.step_timestep = timestep
            return True
        if self.pending is not None and not _same(timestep, self.step_timestep):
            raise RuntimeError(self.unadded_term_message("the next denoising step started without it"))
        return False

    def start_batch(self, batch: PerturbationPlan, size: int, device: torch.device) -> None:
        """Perturb the rows of `batch` in a transformer call of `size` rows on `device`."""
        self.weights = {layer: batch.layer_weights(layer, device) for layer in batch.layers()}
        self.batch_size = size

    def end_transformer_call(self) -> None:
        self.weights = None
        self.batch_size = 0
        self.prefix = None
        self.reentrant = False
        self.attention_reached = 0
        self.call = None

    def set_term(self, scale: float, delta: torch.Tensor) -> None:
        """The PAG term `scale * delta` of the current step, `delta = v_c - v_p` kept for the steps that reuse it."""
        self.delta = delta
        self.pending = PAGTerm(self.step, scale * delta)

    def add_pending(self, model_output: torch.Tensor) -> torch.Tensor:
        """`model_output + s (v_c - v_p)` with the pending PAG term (then cleared); unchanged when there is none."""
        term, self.pending = self.pending, None
        if term is None:
            return model_output
        return _add(model_output, term.value)

    def complete_step(self, model_output: torch.Tensor) -> torch.Tensor:
        r"""
        The scheduler step of the current step: add its PAG term, or raise when a step in the interval has none.

        The term is the one computed at this step from the conditional rows, or, on a step that `pag_reuse` skips,
        the step's scale times the last `v_c - v_p` computed in this call.

        Raises:
            `RuntimeError`: at the first step inside the PAG interval whose conditional prediction was not perturbed,
                naming what the transformer calls of that step looked like and, through `explain`, the likely cause.
        """
        step = self.step
        if self.pending is not None and self.pending.step == step:
            model_output = self.add_pending(model_output)
        elif self.expects_term(step) and not self.fresh() and self.delta is not None:
            model_output = _add(model_output, self.scales[step] * self.delta)
        elif self.expects_term(step):
            raise RuntimeError(self.missing_term_message(step))
        self.pending = None
        self.step = step + 1
        self.conditional_done = False
        self.step_timestep = None
        self.calls_in_step = 0
        return model_output

    def missing_term_message(self, step: int) -> str:
        if self.calls_in_step == 0:
            seen = "no transformer call reached headpag's hook in this step"
        else:
            seen = f"{self.calls_in_step} transformer call(s) reached headpag's hook but none was perturbed"
        extra = self.explain() if self.explain is not None else ""
        return (
            f"head-level PAG was not applied at step {step} (inside pag_interval, scale {self.scales[step]:g}): "
            f"{seen}. {extra}".rstrip()
            + " headpag refuses to return an image without the PAG it was asked for."
        )

    def unadded_term_message(self, when: str) -> str:
        extra = self.explain() if self.explain is not None else ""
        return (
            f"The PAG term of step {self.pending.step} was computed but never added: {when}, and it is the "
            f"`scheduler.step` that headpag wrapped that adds it. {extra}".rstrip()
        )

    def check_finished(self) -> None:
        """At the end of a denoising loop: a PAG term that no scheduler step received is an error."""
        if self.pending is not None:
            raise RuntimeError(self.unadded_term_message("the loop ended without a step after it"))


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))
    return a == b


def _add(model_output: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`model_output + value`, where `value` may carry extra tokens the pipeline drops (FLUX Kontext's reference)."""
    if value.shape != model_output.shape:
        if value.ndim == 3 and value.shape[0] == model_output.shape[0] and value.shape[1] > model_output.shape[1]:
            value = value[:, : model_output.shape[1]]
        else:
            raise RuntimeError(
                f"The PAG term has shape {tuple(value.shape)} but the scheduler got a prediction of shape "
                f"{tuple(model_output.shape)}; this pipeline's layout is not supported by head_pag."
            )
    return model_output + value.to(model_output.dtype)
