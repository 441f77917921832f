"""
Per-family policy: which transformer calls of a diffusers pipeline hold conditional predictions, at which PAG scale.

The conditional call is recognised from the pipeline's data, not from a name only some pipelines set
(`cache_context("cond")` exists in `FluxPipeline` only):

- Every SD3 / FLUX pipeline calls the transformer on the conditional prompt *first* in each denoising step; the
  negative prompt (FLUX true CFG) and the skip-layer branch (SD3 SLG) come after it, in the same step (same
  `timestep`). So only the first transformer call of a step is perturbed.
- SD3 / SD3.5 (text-to-image, img2img, inpaint, ControlNet, ControlNet inpaint): with CFG the call batches
  `[uncond, cond]` (`pipe.do_classifier_free_guidance`); the conditional rows are the second half.
- FLUX.1 (all twelve pipelines): every row of the first call is conditional.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..guidance import Perturbation
from ..runtime import CallState, PerturbedCall
from ..runtime.plan import Decide


@dataclass(frozen=True)
class PAGOptions:
    r"""
    The validated PAG arguments of one pipeline call.

    Args:
        scale (`float`): PAG scale `s >= 0`; 0 disables PAG (no perturbed pass at all).
        perturbation ([`~headpag.guidance.Perturbation`]): identity weight `u`, scope and target.
        interval (`tuple[float, float]`): `(start, stop)` fractions of the steps where PAG runs.
        adaptive_scale (`float`): diffusers' adaptive schedule, `s_t = max(0, s - a (1000 - t))`.
        sequential (`bool`): Run the perturbed rows as a separate transformer call (lower peak memory).
        share_prefix (`bool`): Compute the blocks before the first perturbed layer once.
        reuse (`int`): Run the perturbed branch on steps 0, k, 2k, ... of the interval only; in between, the last
            computed `v_c - v_p` is reused, multiplied by the step's own scale. 1 = every step.
    """

    scale: float = 3.0
    perturbation: Perturbation = Perturbation()
    interval: tuple[float, float] = (0.0, 1.0)
    adaptive_scale: float = 0.0
    sequential: bool = False
    share_prefix: bool = True
    reuse: int = 1

    def __post_init__(self):
        for name, value in (("pag_scale", self.scale), ("pag_adaptive_scale", self.adaptive_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        try:
            start, stop = (float(v) for v in self.interval)
        except (TypeError, ValueError):
            raise ValueError(f"pag_interval must be (start, stop) fractions, got {self.interval!r}.") from None
        if not 0.0 <= start <= stop <= 1.0:
            raise ValueError(f"pag_interval must satisfy 0 <= start <= stop <= 1, got {self.interval!r}.")
        object.__setattr__(self, "interval", (start, stop))
        reuse = self.reuse
        if isinstance(reuse, bool) or not isinstance(reuse, int) or not 1 <= reuse <= MAX_REUSE:
            raise ValueError(f"pag_reuse must be an integer in [1, {MAX_REUSE}], got {reuse!r}.")

    def active(self, step: int, num_steps: int) -> bool:
        """Whether `step` (0-based) lies in the interval, counted like diffusers' guiders."""
        start, stop = self.interval
        return int(start * num_steps) <= step < int(stop * num_steps)

    def scale_at(self, timestep: float) -> float:
        """The PAG scale at scheduler timestep `t` in [0, 1000], with the adaptive schedule clamped at 0."""
        if self.adaptive_scale <= 0:
            return float(self.scale)
        return max(0.0, float(self.scale) - self.adaptive_scale * (1000.0 - float(timestep)))

    def step_scales(self, num_steps: int, timesteps: list[float] | None = None) -> list[float]:
        """The PAG scale of every step of a loop of `num_steps` (0 outside the interval); `timesteps` for the
        adaptive schedule."""
        return [
            (self.scale_at(timesteps[i]) if timesteps is not None else float(self.scale))
            if self.active(i, num_steps)
            else 0.0
            for i in range(num_steps)
        ]

    def fresh_steps(self, num_steps: int) -> list[bool]:
        """Which steps run the perturbed branch: 0, k, 2k, ... counted from the interval's first step."""
        first = int(self.interval[0] * num_steps)
        return [i >= first and (i - first) % self.reuse == 0 for i in range(num_steps)]


MAX_REUSE = 1000


def loop_plan(pipe, options: PAGOptions, total: int | None) -> tuple[list[float], list[bool]]:
    """
    The PAG scale of every step of the denoising loop that `pipe` is starting, and which steps run the perturbed
    branch: its step count (`pipe._num_timesteps`, else the progress bar's total) and, for the adaptive schedule, its
    scheduler's timesteps (read once per call).
    """
    scheduler = pipe.scheduler
    num_steps = getattr(pipe, "_num_timesteps", None) or total or len(scheduler.timesteps)
    timesteps = None
    if options.adaptive_scale > 0:
        begin = getattr(scheduler, "begin_index", None) or 0
        timesteps = [float(t) for t in scheduler.timesteps[begin : begin + num_steps].tolist()]
    return options.step_scales(num_steps, timesteps), options.fresh_steps(num_steps)


def _conditional(kwargs: dict[str, Any], state: CallState, rows: list[int]) -> PerturbedCall | None:
    if not state.begin_conditional(kwargs.get("timestep")):
        return None
    scale = state.scale()
    return PerturbedCall(rows, scale) if scale > 0 and rows and state.fresh() else None


def sd3_policy(pipe) -> Decide:
    def decide(kwargs: dict[str, Any], state: CallState) -> PerturbedCall | None:
        if kwargs.get("skip_layers") is not None:
            return None
        n = kwargs["hidden_states"].shape[0]
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
        return _conditional(kwargs, state, list(range(n // 2, n)) if cfg else list(range(n)))

    return decide


def flux_policy(pipe) -> Decide:
    def decide(kwargs: dict[str, Any], state: CallState) -> PerturbedCall | None:
        return _conditional(kwargs, state, list(range(kwargs["hidden_states"].shape[0])))

    return decide


POLICIES = {"sd3": sd3_policy, "flux": flux_policy}
