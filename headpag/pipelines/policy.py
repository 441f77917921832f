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
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
        return _conditional(kwargs, state, conditional_rows("sd3", kwargs["hidden_states"].shape[0], cfg))

    return decide


def flux_policy(pipe) -> Decide:
    def decide(kwargs: dict[str, Any], state: CallState) -> PerturbedCall | None:
        return _conditional(kwargs, state, conditional_rows("flux", kwargs["hidden_states"].shape[0], False))

    return decide


POLICIES = {"sd3": sd3_policy, "flux": flux_policy}


# ---------------------------------------------------------------------------------------------------------------
# Prompts, CFG and sampling per family, for code that drives the transformer itself (HeadHunter's batched renders
# and its differentiable sampler): the same decisions the pipelines make.


def uses_cfg(
    family: str, guidance_scale: float, true_cfg_scale: float = 1.0, negative_prompt: str | None = None
) -> bool:
    """Whether a call runs an unconditional prediction: SD3 when `guidance_scale > 1` (as the pipelines'
    `do_classifier_free_guidance`); FLUX only with true CFG (`true_cfg_scale > 1` and a negative prompt)."""
    if family == "sd3":
        return guidance_scale > 1
    return true_cfg_scale > 1 and negative_prompt is not None


def cfg_scale(family: str, guidance_scale: float, true_cfg_scale: float = 1.0) -> float:
    """The CFG scale `g` of `v_u + g (v_c - v_u)`: SD3's `guidance_scale`, FLUX's `true_cfg_scale`."""
    return guidance_scale if family == "sd3" else true_cfg_scale


def encode_prompt(
    pipe, family: str, prompt: str, negative_prompt: str | None, cfg: bool, max_sequence_length: int | None = None
) -> dict[str, Any]:
    """`prompt_embeds`, `pooled_prompt_embeds` (and the negative ones with CFG), as the family's pipelines encode
    them."""
    msl = {"max_sequence_length": max_sequence_length} if max_sequence_length else {}
    if family == "sd3":
        pe, npe, pp, npp = pipe.encode_prompt(
            prompt, prompt, prompt, negative_prompt=negative_prompt or "", do_classifier_free_guidance=cfg, **msl
        )
    else:
        pe, pp, _ = pipe.encode_prompt(prompt, prompt, **msl)
        if cfg:
            npe, npp, _ = pipe.encode_prompt(negative_prompt, negative_prompt, **msl)
    out = {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
    if cfg:
        out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npp)
    return out


def conditional_rows(family: str, batch: int, cfg: bool) -> list[int]:
    """The conditional rows of a conditional transformer call: SD3 with CFG batches `[uncond, cond]`."""
    return list(range(batch // 2, batch)) if family == "sd3" and cfg else list(range(batch))


@dataclass
class Sampling:
    r"""
    What a hand-driven sampling run of one image needs from its family: the pipeline's starting latents (same
    generator) and scheduler timesteps (shift included), the guided transformer calls, and the decoder.

    Args:
        latents (`torch.Tensor`): The starting latents.
        scheduler: A copy of the pipeline's scheduler with its timesteps set.
        predict (`Callable`): `predict(latents, t, embeddings, cfg) -> (v_uncond or None, v_cond)`; the conditional
            call comes first (the order every SD3 / FLUX pipeline uses, which the head-PAG policy relies on).
        decode (`Callable`): `decode(latents) -> (B, 3, H, W)` in [0, 1], float32 or wider.
    """

    latents: Any
    scheduler: Any
    predict: Any
    decode: Any


def sampling(
    pipe, family: str, height: int, width: int, seed: int, steps: int, guidance_scale: float, dtype
) -> Sampling:
    """The [`Sampling`] of one image of `pipe` (see there)."""
    import copy

    import numpy as np
    import torch

    transformer, device = pipe.transformer, pipe._execution_device
    generator = torch.Generator().manual_seed(seed)
    scheduler = copy.deepcopy(pipe.scheduler)
    config = scheduler.config

    def decode(latents):
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        image = image.to(torch.promote_types(image.dtype, torch.float32))  # float32 at least (float64 stays)
        return (image / 2 + 0.5).clamp(0, 1)

    if family == "sd3":
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        channels = transformer.config.in_channels
        latents = pipe.prepare_latents(1, channels, height, width, dtype, device, [generator], None)
        kwargs: dict[str, Any] = {}
        if config.get("use_dynamic_shifting", None):
            patch = transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (latents.shape[2] // patch) * (latents.shape[3] // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(steps, device=device, **kwargs)

        def predict(x, t, emb, cfg):
            pe, pp = emb["prompt_embeds"], emb["pooled_prompt_embeds"]
            if cfg:  # one call on [uncond, cond], as the pipelines batch it
                pe = torch.cat([emb["negative_prompt_embeds"], pe])
                pp = torch.cat([emb["negative_pooled_prompt_embeds"], pp])
                x = torch.cat([x] * 2)
            v = transformer(
                hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=pe, pooled_projections=pp,
                return_dict=False,
            )[0]  # fmt: skip
            return tuple(v.chunk(2)) if cfg else (None, v)

        return Sampling(latents, scheduler, predict, decode)

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    latents, image_ids = pipe.prepare_latents(
        1, transformer.config.in_channels // 4, height, width, dtype, device, [generator], None
    )
    sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(
        latents.shape[1],
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    if sigmas is None:
        scheduler.set_timesteps(steps, device=device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])

    def call(x, t, embeds, pooled):
        return transformer(
            hidden_states=x,
            timestep=t.expand(x.shape[0]).to(x.dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype),
            img_ids=image_ids,
            return_dict=False,
        )[0]

    def predict(x, t, emb, cfg):  # the conditional call first, then the negative one (FluxPipeline's order)
        v_c = call(x, t, emb["prompt_embeds"], emb["pooled_prompt_embeds"])
        v_u = call(x, t, emb["negative_prompt_embeds"], emb["negative_pooled_prompt_embeds"]) if cfg else None
        return v_u, v_c

    def decode_flux(x):
        return decode(pipe._unpack_latents(x, height, width, pipe.vae_scale_factor))

    return Sampling(latents, scheduler, predict, decode_flux)
