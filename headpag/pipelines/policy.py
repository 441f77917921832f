"""
Per-family policy: which transformer calls of a diffusers pipeline hold conditional predictions, at which PAG scale.

- SD3 / SD3.5 (text-to-image, img2img, inpaint, ControlNet): CFG batches `[uncond, cond]` in one call when
  `pipe.do_classifier_free_guidance`; the skip-layer-guidance call (`skip_layers=...`) is left alone.
- FLUX.1 (all pipelines): the conditional call runs under `cache_context("cond")`, true CFG's negative prompt under
  `"uncond"` (left alone); every row of a conditional call is conditional.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..guidance import Perturbation
from ..runtime import PerturbedCall


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
    """

    scale: float = 3.0
    perturbation: Perturbation = Perturbation()
    interval: tuple[float, float] = (0.0, 1.0)
    adaptive_scale: float = 0.0
    sequential: bool = False
    share_prefix: bool = True

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

    def active(self, step: int, num_steps: int) -> bool:
        """Whether `step` (0-based) lies in the interval, counted like diffusers' guiders."""
        start, stop = self.interval
        return int(start * num_steps) <= step < int(stop * num_steps)

    def scale_at(self, timestep: float) -> float:
        """The PAG scale at scheduler timestep `t` in [0, 1000], with the adaptive schedule clamped at 0."""
        if self.adaptive_scale <= 0:
            return float(self.scale)
        return max(0.0, float(self.scale) - self.adaptive_scale * (1000.0 - float(timestep)))


def current_step(pipe) -> tuple[int, float, int]:
    """`(step index within this call, scheduler timestep in [0, 1000], steps in this call)` of the pipeline."""
    scheduler = pipe.scheduler
    begin = scheduler.begin_index or 0
    absolute = begin if scheduler.step_index is None else scheduler.step_index
    num_steps = getattr(pipe, "_num_timesteps", None) or len(scheduler.timesteps) - begin
    return absolute - begin, float(scheduler.timesteps[absolute]), num_steps


def _gate(pipe, options: PAGOptions, rows: list[int]) -> PerturbedCall | None:
    step, timestep, num_steps = current_step(pipe)
    scale = options.scale_at(timestep)
    if scale <= 0 or not options.active(step, num_steps) or not rows:
        return None
    return PerturbedCall(rows, scale)


def sd3_policy(pipe, options: PAGOptions) -> Callable[[dict[str, Any], str | None], PerturbedCall | None]:
    def decide(kwargs: dict[str, Any], context: str | None) -> PerturbedCall | None:
        if kwargs.get("skip_layers") is not None:
            return None
        n = kwargs["hidden_states"].shape[0]
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
        return _gate(pipe, options, list(range(n // 2, n)) if cfg else list(range(n)))

    return decide


def flux_policy(pipe, options: PAGOptions) -> Callable[[dict[str, Any], str | None], PerturbedCall | None]:
    def decide(kwargs: dict[str, Any], context: str | None) -> PerturbedCall | None:
        if context == "uncond":
            return None
        return _gate(pipe, options, list(range(kwargs["hidden_states"].shape[0])))

    return decide


POLICIES = {"sd3": sd3_policy, "flux": flux_policy}
