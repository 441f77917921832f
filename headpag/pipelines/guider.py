"""`HeadPerturbedAttentionGuidance`: head-level PAG as a diffusers modular guider."""

from __future__ import annotations

import math
import weakref

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import PerturbedAttentionGuidance
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg
from diffusers.utils import logging

from ..guidance import HeadSet, Perturbation
from ..runtime import CallPlan, describe_transformer, ensure_hooks, mark_input
from .attach import check_caches, resolve_head_sets
from .policy import MAX_REUSE


logger = logging.get_logger(__name__)


class HeadPerturbedAttentionGuidance(PerturbedAttentionGuidance):
    r"""
    Head-level perturbed-attention guidance ([PAG](https://huggingface.co/papers/2403.17377), SoftPAG and the heads of
    [HeadHunter](https://huggingface.co/papers/2506.10978)) for diffusers' modular SD3 / SD3.5 pipelines:

    `v = v_u + g (v_c - v_u) + s (v_c - v_p)`, where `v_p` is the conditional prediction with the heads of
    `pag_heads` perturbed by `A <- (1 - u) A + u I` inside the installed attention processors (joint attention
    included, where diffusers' `PerturbedAttentionGuidance` raises "JointAttnProcessor2_0 not registered").

    CFG and PAG each run on the steps of their own window (`start`/`stop`, `pag_start`/`pag_stop`); with
    `guidance_scale=1` the guider is PAG alone (`v_c + s (v_c - v_p)`). The perturbed batch is recognised by its own
    `hidden_states` tensor, so nothing stays active after a step: a run that fails leaves the transformer exactly as
    it was, and runs in other threads are independent. A step whose perturbed batch did not reach headpag's hook
    raises. **Modular FLUX.1 is not supported**: diffusers' modular FLUX.1 blocks (`FluxAutoBlocks`) have no guider
    component, so a guider set on them is never called; use `FluxHeadPAGPipeline` or `head_pag` instead.

    ```py
    >>> from headpag import HeadPerturbedAttentionGuidance
    >>> guider = HeadPerturbedAttentionGuidance(guidance_scale=5.0, pag_scale=3.0, pag_heads="11.15, 7")
    >>> pipe.update_components(guider=guider)
    ```

    Args:
        guidance_scale (`float`, defaults to 7.0): CFG scale `g` (1 turns CFG off).
        pag_scale (`float`, defaults to 3.0): PAG scale `s` (0 turns PAG off).
        pag_heads (`str`, *optional*): Head spec, e.g. `"11.15, 7"`; `None`: all heads of layer 7 (SD3) / 8 (FLUX).
        pag_identity_weight (`float`, defaults to 1.0): SoftPAG's `u` in `[0, 1]`.
        pag_identity_scope (`str`, defaults to `"joint"`): `"joint"` or `"image"`.
        pag_target (`str`, defaults to `"identity"`): `"identity"`, `"uniform"` or `"query_mean"`.
        pag_start, pag_stop (`float`, defaults to 0.0 and 1.0): Fractions of the steps with PAG, counted like
            `pag_interval` of the pipelines (`int(start * N) <= step < int(stop * N)`).
        pag_reuse (`int`, defaults to 1): Run the perturbed batch on steps 0, k, 2k, ... of the PAG window only; the
            steps in between reuse the last `v_c - v_p`.
        guidance_rescale (`float`, defaults to 0.0): As in diffusers' guiders.
        use_original_formulation (`bool`, defaults to `False`): As in diffusers' guiders.
        start, stop (`float`, defaults to 0.0 and 1.0): Fractions of the steps with CFG.
        enabled (`bool`, defaults to `True`): Turn the guider off.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_skip"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.0,
        pag_scale: float = 3.0,
        pag_heads: str | None = None,
        pag_identity_weight: float = 1.0,
        pag_identity_scope: str = "joint",
        pag_target: str = "identity",
        pag_start: float = 0.0,
        pag_stop: float = 1.0,
        pag_reuse: int = 1,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        BaseGuidance.__init__(self, start, stop, enabled)
        for name, value in (("guidance_scale", guidance_scale), ("pag_scale", pag_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if not 0.0 <= pag_start <= pag_stop <= 1.0:
            raise ValueError(f"pag_start/pag_stop must satisfy 0 <= start <= stop <= 1, got {pag_start}, {pag_stop}.")
        self.perturbation = Perturbation(pag_identity_weight, pag_identity_scope, pag_target)
        self.heads = None if pag_heads is None else HeadSet.coerce(pag_heads)
        self.guidance_scale = guidance_scale
        self.skip_layer_guidance_scale = pag_scale
        self.skip_layer_guidance_start = pag_start
        self.skip_layer_guidance_stop = pag_stop
        if isinstance(pag_reuse, bool) or not isinstance(pag_reuse, int) or not 1 <= pag_reuse <= MAX_REUSE:
            raise ValueError(f"pag_reuse must be an integer in [1, {MAX_REUSE}], got {pag_reuse!r}.")
        self.pag_reuse = pag_reuse
        self._delta: torch.Tensor | None = None
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation
        self._plans: dict[int, tuple[weakref.ref, CallPlan]] = {}
        self._perturbed_input: torch.Tensor | None = None
        self._mark = None

    # ------------------------------------------------------------------ batches
    @property
    def num_conditions(self) -> int:
        return 1 + int(self._is_cfg_enabled()) + int(self._is_slg_enabled() and self._pag_fresh())

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared != 2 or not self._is_cfg_enabled()

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._perturbed_input = None
        self._mark = None
        if step == 0:
            self._delta = None

    def _pag_fresh(self) -> bool:
        """Whether this step runs the perturbed batch (`pag_reuse`: steps 0, k, 2k, ... of the PAG window)."""
        if self._num_inference_steps is None:
            return True
        first = int(self.skip_layer_guidance_start * self._num_inference_steps)
        return (self._step - first) % self.pag_reuse == 0

    def _batches(self, make) -> list:
        """`[cond, uncond (with CFG), perturbed (with PAG)]`, each enabled on its own steps."""
        batches = [make(0, "pred_cond")]
        if self._is_cfg_enabled():
            batches.append(make(1, "pred_uncond"))
        if self._is_slg_enabled() and self._pag_fresh():
            batch = make(0, "pred_cond_skip")
            hidden = getattr(batch, "hidden_states", None)
            if isinstance(hidden, torch.Tensor):
                # A view of its own: the transformer hook recognises the perturbed batch by this tensor object.
                batch.hidden_states = hidden.view_as(hidden)
                self._perturbed_input = batch.hidden_states
            batches.append(batch)
        return batches

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        return self._batches(lambda index, name: self._prepare_batch(data, index, name))

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, str | tuple[str, str]]) -> list:
        return self._batches(lambda index, name: self._prepare_batch_from_block_state(input_fields, data, index, name))

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        last = self._count_prepared == self.num_conditions
        if last and self._is_slg_enabled() and self._perturbed_input is not None:
            self._mark = mark_input(self._perturbed_input, self._plan(denoiser))

    def _plan(self, denoiser: torch.nn.Module) -> CallPlan:
        """The plan for `denoiser`, built once per transformer (the guider's settings are fixed)."""
        layout = describe_transformer(denoiser)
        cached = self._plans.get(id(layout.model))
        if cached is not None and cached[0]() is layout.model:
            ensure_hooks(cached[1])
            return cached[1]
        plan = CallPlan(
            layout,
            resolve_head_sets(self.heads, layout),
            self.perturbation,
            _never,
            share_prefix=False,
            has_caches=check_caches(layout),
        )
        ensure_hooks(plan)
        self._plans[id(layout.model)] = (weakref.ref(layout.model), plan)
        return plan

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        pass

    def forward(
        self,
        pred_cond: torch.Tensor,
        pred_uncond: torch.Tensor | None = None,
        pred_cond_skip: torch.Tensor | None = None,
    ) -> GuiderOutput:
        """`v_u + g (v_c - v_u) + s (v_c - v_p)` (the CFG or PAG term only when it is enabled at this step)."""
        cfg, pag = self._is_cfg_enabled(), self._is_slg_enabled()
        fresh = pag and self._pag_fresh()
        if fresh and (self._mark is None or not self._mark.used):
            raise RuntimeError(
                f"Step {self._step}: the guider's perturbed batch did not reach headpag's transformer hook, so "
                "`pred_cond_skip` is not a perturbed prediction. The modular blocks must pass the batch's "
                "`hidden_states` to the transformer as given (diffusers' modular SD3 blocks do; diffusers' modular "
                "FLUX.1 blocks have no guider at all and are not supported)."
            )
        delta = pred_cond - pred_cond_skip if fresh else self._delta
        if fresh:
            self._delta = delta
        elif pag and delta is None:
            raise RuntimeError(f"Step {self._step}: pag_reuse={self.pag_reuse} has no computed PAG term to reuse.")
        pred = pred_cond if (self.use_original_formulation or not cfg) else pred_uncond
        if cfg:
            pred = pred + self.guidance_scale * (pred_cond - pred_uncond)
        if pag:
            pred = pred + self.skip_layer_guidance_scale * delta
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def _is_slg_enabled(self) -> bool:
        if not self._enabled or math.isclose(self.skip_layer_guidance_scale, 0.0):
            return False
        if self._num_inference_steps is None:
            return True
        start = int(self.skip_layer_guidance_start * self._num_inference_steps)
        stop = int(self.skip_layer_guidance_stop * self._num_inference_steps)
        return start <= self._step < stop


def _never(kwargs, state) -> None:
    """The guider's plan is only used for its marked perturbed batches, never by a pipeline loop's policy."""
    return None
