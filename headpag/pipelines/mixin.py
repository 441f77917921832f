"""
`HeadPAGMixin`: head-level PAG for a diffusers pipeline without touching its denoising loop.

For the duration of a call, the transformer's `forward` is wrapped: each step's call carries the perturbed copies of
the conditional rows as extra batch rows, and the conditional prediction it returns is replaced by
`v_c + (s / g)(v_c - v_p)` (or `v_c + s (v_c - v_p)` without CFG). The parent pipeline's own CFG arithmetic then
yields `v = v_u + g (v_c - v_u) + s (v_c - v_p)` exactly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import logging

from ..guidance import HeadSet, Perturbation, PerturbedTransformer, describe_transformer, fold_into_conditional
from ..guidance.heads import HeadSetLike
from ..guidance.session import output_sample, overridden, replace_sample


logger = logging.get_logger(__name__)

# Built-in default head sets (all heads of one layer), see README "Default heads".
DEFAULT_LAYER = {"sd3": 7, "flux": 8}


def default_pag_heads(family: str, num_layers: int) -> HeadSet:
    """All heads of layer 7 (SD3 family) or 8 (FLUX); on smaller (test) models the middle layer."""
    layer = DEFAULT_LAYER[family]
    return HeadSet([layer if layer < num_layers else num_layers // 2])


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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
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


class HeadPAGMixin:
    r"""
    Adds head-level perturbed-attention guidance to a diffusers SD3 or FLUX pipeline (mix it in first).

    Extra call arguments (keyword only): `pag_heads`, `pag_scale`, `pag_identity_weight`, `pag_identity_scope`,
    `pag_target`, `pag_interval`, `pag_adaptive_scale`, `pag_sequential`, `pag_share_prefix`; see `__call__`.
    """

    def _init_head_pag(self, pag_heads: HeadSetLike, pag_sequential: bool) -> None:
        self._pag_heads: HeadSet | None = None
        self._pag_sequential = bool(pag_sequential)
        if pag_heads is not None and getattr(self, "transformer", None) is not None:
            self.set_pag_heads(pag_heads)
        elif pag_heads is not None:
            self._pag_heads = HeadSet.coerce(pag_heads)

    # ------------------------------------------------------------------ configuration
    @property
    def pag_heads(self) -> HeadSet:
        """The default head set of this pipeline (used when a call passes `pag_heads=None`)."""
        if self._pag_heads is not None:
            return self._pag_heads
        layout = describe_transformer(self.transformer)
        return default_pag_heads(layout.family, layout.num_layers)

    def set_pag_heads(self, pag_heads: HeadSetLike) -> None:
        """
        Set the default head set, checked against the model.

        Args:
            pag_heads (`HeadSet`, `str`, or list of pairs / layer ints): e.g. `"11.15, 7"`; `None` restores the
                built-in default (see README).
        """
        if pag_heads is None:
            self._pag_heads = None
            return
        heads = HeadSet.coerce(pag_heads)
        layout = describe_transformer(self.transformer)
        heads.resolve(layout.num_layers, layout.num_heads)
        self._pag_heads = heads

    def set_pag_sequential(self, sequential: bool) -> None:
        """Run the perturbed branch as its own transformer call (lower peak memory) by default."""
        self._pag_sequential = bool(sequential)

    # ------------------------------------------------------------------ family hooks
    def _pag_cfg_scale(self, arguments: dict[str, Any]) -> float | None:
        """The CFG scale `g` that the parent pipeline applies in this call, or `None` when CFG is off."""
        raise NotImplementedError

    def _pag_cond_rows(self, batch: int, cfg: bool, context: str | None) -> list[int] | None:
        """Rows of a transformer call that hold conditional predictions, or `None` for a call to leave alone."""
        raise NotImplementedError

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        *args: Any,
        pag_heads: HeadSetLike | Sequence[HeadSet] = None,
        pag_scale: float = 3.0,
        pag_identity_weight: float = 1.0,
        pag_identity_scope: str = "joint",
        pag_target: str = "identity",
        pag_interval: tuple[float, float] = (0.0, 1.0),
        pag_adaptive_scale: float = 0.0,
        pag_sequential: bool | None = None,
        pag_share_prefix: bool = True,
        **kwargs: Any,
    ):
        r"""
        The parent pipeline's call with head-level PAG; every parent argument works unchanged.

        Args:
            pag_heads (`HeadSet`, `str`, list of `(layer, head)` pairs or layer ints, *optional*):
                Heads to perturb, e.g. `"11.15, 7"`. `None` uses the pipeline's default (`set_pag_heads`). A list of
                `HeadSet` objects gives every generated image its own head set (one per prompt x image).
            pag_scale (`float`, defaults to 3.0):
                PAG scale `s`. `0` gives exactly the parent pipeline's output and runs no perturbed pass.
            pag_identity_weight (`float`, defaults to 1.0):
                SoftPAG's `u` in `[0, 1]`: `A <- (1 - u) A + u I`. 1 is PAG; 0.25-0.5 avoids over-smoothing.
            pag_identity_scope (`str`, defaults to `"joint"`):
                `"joint"` (the paper's identity over image and text tokens) or `"image"` (diffusers-compatible).
            pag_target (`str`, defaults to `"identity"`): `"identity"`, `"uniform"` or `"query_mean"`.
            pag_interval (`tuple[float, float]`, defaults to `(0.0, 1.0)`):
                Fractions of the denoising steps where PAG is applied; outside, no perturbed pass runs.
            pag_adaptive_scale (`float`, defaults to 0.0):
                diffusers' adaptive schedule `s - a (1000 - t)`, clamped at 0; at 0 no perturbed pass runs.
            pag_sequential (`bool`, *optional*):
                Run the perturbed rows as a separate transformer call (lower peak memory). Defaults to the
                pipeline setting (`set_pag_sequential`, `False`).
            pag_share_prefix (`bool`, defaults to `True`):
                Compute the blocks before the first perturbed layer once for the conditional and perturbed rows.
        """
        perturbation = Perturbation(pag_identity_weight, pag_identity_scope, pag_target)
        options = PAGOptions(
            scale=pag_scale,
            perturbation=perturbation,
            interval=tuple(pag_interval),
            adaptive_scale=pag_adaptive_scale,
            sequential=self._pag_sequential if pag_sequential is None else bool(pag_sequential),
            share_prefix=bool(pag_share_prefix),
        )
        parent_call = super().__call__
        if options.scale == 0:
            return parent_call(*args, **kwargs)

        runner = PerturbedTransformer(self.transformer, perturbation, options.share_prefix, options.sequential)
        if isinstance(pag_heads, (list, tuple)) and pag_heads and all(isinstance(h, HeadSet) for h in pag_heads):
            head_sets = [runner.resolve(h) for h in pag_heads]
        else:
            head_sets = [runner.resolve(self.pag_heads if pag_heads is None else pag_heads)]
        if not any(head_sets):
            return parent_call(*args, **kwargs)

        bound = inspect.signature(parent_call).bind(*args, **kwargs)
        bound.apply_defaults()
        cfg_scale = self._pag_cfg_scale(bound.arguments)
        with runner.installed(head_sets), self._pag_hooked_transformer(runner, options, cfg_scale, head_sets):
            return parent_call(*args, **kwargs)

    # ------------------------------------------------------------------ the transformer wrapper
    @contextlib.contextmanager
    def _pag_hooked_transformer(
        self, runner: PerturbedTransformer, options: PAGOptions, cfg_scale: float | None, head_sets: list[HeadSet]
    ) -> Iterator[None]:
        transformer = self.transformer
        original_forward = transformer.forward
        original_context = getattr(transformer, "cache_context", None)
        context = {"name": None}

        @contextlib.contextmanager
        def cache_context(name: str, *args, **kwargs):
            context["name"] = name
            try:
                with original_context(name, *args, **kwargs):
                    yield
            finally:
                context["name"] = None

        forward = functools.partial(
            self._pag_forward, original_forward, runner, options, cfg_scale, head_sets, context
        )
        with contextlib.ExitStack() as stack:
            stack.enter_context(overridden(transformer, "forward", forward))
            if original_context is not None:
                stack.enter_context(overridden(transformer, "cache_context", cache_context))
            yield

    def _pag_step(self) -> tuple[int, float]:
        """`(step index within this call, scheduler timestep in [0, 1000])` of the current transformer call."""
        scheduler = self.scheduler
        begin = scheduler.begin_index or 0
        absolute = begin if scheduler.step_index is None else scheduler.step_index
        return absolute - begin, float(scheduler.timesteps[absolute])

    def _pag_forward(
        self,
        original_forward,
        runner: PerturbedTransformer,
        options: PAGOptions,
        cfg_scale: float | None,
        head_sets: list[HeadSet],
        context: dict,
        *args,
        **kwargs,
    ):
        if args:
            kwargs = dict(inspect.signature(original_forward).bind_partial(*args, **kwargs).arguments)
        if kwargs.get("skip_layers") is not None:  # SD3's skip-layer-guidance pass: leave it alone
            return original_forward(**kwargs)
        step, timestep = self._pag_step()
        scale = options.scale_at(timestep)
        batch = kwargs["hidden_states"].shape[0]
        cond_rows = self._pag_cond_rows(batch, cfg_scale is not None, context["name"])
        if scale <= 0 or not options.active(step, self._num_timesteps) or not cond_rows:
            return original_forward(**kwargs)
        if len(head_sets) not in (1, len(cond_rows)):
            raise ValueError(
                f"pag_heads has {len(head_sets)} head sets but the call generates {len(cond_rows)} images; "
                "pass one head set, or one per image (prompts x num_images_per_prompt)."
            )
        output, perturbed = runner.run(original_forward, kwargs, cond_rows, head_sets)
        sample = output_sample(output)
        rows = torch.tensor(cond_rows, device=sample.device)
        folded = fold_into_conditional(sample[rows], perturbed.to(sample.dtype), scale, cfg_scale)
        return replace_sample(output, sample.index_copy(0, rows, folded))
