"""
The gradient prefilter of HeadHunter's `strategy="gradient"`: d objective / d (identity weight of every head).

Every head of the model gets a weight `u[layer, head]`, 0 for the round's candidates (with `requires_grad`) and the
configured identity weight for the heads selected in earlier rounds, and the perturbed branch computes
`(1 - u) SDPA(Q, K, V) + u V` per head (the runtime's `torch.lerp` in [`~guidance.softpag.softpag`], which carries
the gradient). A short sampling run (`grad_steps` Euler steps, a loop of its own written here over the pipeline's
transformer, scheduler and VAE: the pipeline's `__call__` runs under `torch.no_grad`) renders each prompt-seed pair,
a differentiable objective scores the decoded `(B, 3, H, W)` tensor in [0, 1], and backward gives every candidate's
gradient: higher means adding that head raises the objective (to first order, at a zero weight).

Memory: one pair at a time. By default on accelerators each sampling step is checkpointed
(`torch.utils.checkpoint`): only the step inputs are kept and a step is recomputed during backward, so the peak is
one step's activations rather than `grad_steps` of them. Checkpointing single transformer blocks is not used: the
head-PAG hooks read the active plan at forward time, which is gone when a block is recomputed during backward; a
checkpointed step activates its own plan again when it is recomputed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers.utils import logging

from ..guidance import HeadSet
from ..guidance.plan import PerturbationPlan
from ..guidance.softpag import Perturbation
from ..pipelines.policy import cfg_scale, conditional_rows, sampling
from ..runtime import CallPlan, CallState, PerturbedCall, activated, ensure_hooks
from .cost import Cost


logger = logging.get_logger(__name__)

Head = tuple[int, int]
# Backward is counted as two forward passes: the gradient pass costs three times its forward row-evaluations.
BACKWARD_FORWARDS = 2.0


def is_differentiable(objective: Any) -> bool:
    """Whether `objective` declares `differentiable = True` (takes a float tensor and prompts, returns `(B,)`)."""
    return getattr(objective, "differentiable", False) is True


def objective_name(objective: Any) -> str:
    """A readable name of an objective (for error messages)."""
    name = getattr(objective, "__name__", None) or type(objective).__name__
    return repr(name)


def require_differentiable(objective: Any) -> None:
    """Raise a `ValueError` naming `objective` unless it can be used by `strategy="gradient"`."""
    if not is_differentiable(objective):
        raise ValueError(
            f"strategy='gradient' needs a differentiable objective, but the objective {objective_name(objective)} is "
            "not: it must have `differentiable = True` and take a (B, 3, H, W) float tensor in [0, 1] and the "
            "prompts, returning a (B,) tensor that backward can go through (e.g. 'clip', headpag.eval.ClipScore). "
            "Use strategy='halving' or 'exhaustive' with this objective."
        )


class WeightedPlan(PerturbationPlan):
    r"""
    A [`PerturbationPlan`] whose per-head identity weights are rows of a `(num_layers, num_heads)` tensor that may
    require grad: every perturbed row of a layer gets the weights `matrix[layer]`, so the blend is differentiable in
    them. Only layers with at least one head in `heads` are perturbed.

    Args:
        rows (`Sequence[int]`): Perturbed batch rows.
        heads (`HeadSet`): The heads whose weight may be non-zero (selected heads and candidates).
        matrix (`torch.Tensor`): `(num_layers, num_heads)` weights.
        perturbation ([`Perturbation`]): Scope and target (its identity weight is unused: `matrix` holds them).
    """

    def __init__(self, rows: Sequence[int], heads: HeadSet, matrix: torch.Tensor, perturbation: Perturbation):
        super().__init__(rows, [heads] * len(rows), perturbation, matrix.shape[1])
        self.matrix = matrix

    def layer_weights(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if layer not in self._layers:
            return None
        rows = self._layers[layer][0].to(device)
        return rows, self.matrix[layer].to(device).unsqueeze(0).expand(len(rows), -1)


class WeightedCallPlan(CallPlan):
    """A [`CallPlan`] whose perturbed rows use a [`WeightedPlan`] (built per call: it holds a graph)."""

    def __init__(self, layout, heads: HeadSet, matrix: torch.Tensor, perturbation: Perturbation, decide):
        super().__init__(layout, [heads], perturbation, decide, share_prefix=True)
        self.heads = heads
        self.matrix = matrix

    def batch_plan(self, first_row: int, count: int) -> PerturbationPlan:
        return WeightedPlan(range(first_row, first_row + count), self.heads, self.matrix, self.perturbation)


@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients (only the head weights need them); the flags are restored."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def render(
    hunter,
    matrix: torch.Tensor,
    heads: HeadSet,
    prompt: str,
    seed: int,
    steps: int,
    checkpoint: bool = False,
) -> torch.Tensor:
    r"""
    One image, differentiable in `matrix`: the pipeline's latents (same generator) and timesteps, its CFG
    (`v_u + g (v_c - v_u)`, the unconditional prediction unperturbed) and PAG (`+ s (v_c - v_p)`) over `steps` Euler
    steps, decoded to `(1, 3, H, W)` in [0, 1]. The per-family parts (latents, timesteps, the guided transformer
    calls, decoding) are [`~headpag.pipelines.policy.sampling`]'s.

    Args:
        hunter ([`HeadHunter`]): Its pipeline, settings and text embeddings.
        matrix (`torch.Tensor`): `(num_layers, num_heads)` identity weights.
        heads (`HeadSet`): Heads whose weight may be non-zero.
        prompt (`str`), seed (`int`): The pair. steps (`int`): Sampling steps.
        checkpoint (`bool`, defaults to `False`): Checkpoint each sampling step (see [`head_gradients`]).
    """
    pipe, c, family = hunter.pipe, hunter.config, hunter.family
    cfg, emb = hunter._cfg(), hunter._embed(prompt)
    run = sampling(pipe, family, c.height, c.width, seed, steps, c.guidance_scale, emb["prompt_embeds"].dtype)
    g = cfg_scale(family, c.guidance_scale, c.true_cfg_scale)
    perturbation = Perturbation(c.pag_identity_weight, c.pag_identity_scope)

    def decide(call_kwargs: dict[str, Any], state: CallState) -> PerturbedCall | None:
        if not state.begin_conditional(call_kwargs.get("timestep")):
            return None  # FLUX's negative-prompt call
        return PerturbedCall(conditional_rows(family, call_kwargs["hidden_states"].shape[0], cfg), c.pag_scale)

    def velocity(latents: torch.Tensor, matrix: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        plan = WeightedCallPlan(hunter.layout, heads, matrix, perturbation, decide)
        ensure_hooks(plan)
        with activated(plan) as state:
            v_u, v_c = run.predict(latents, t, emb, cfg)
            return state.add_pending(v_c if v_u is None else v_u + g * (v_c - v_u))

    return run.decode(sample_euler(velocity, run.latents, matrix, run.scheduler, checkpoint))


def sample_euler(
    velocity: Callable[..., torch.Tensor], x: torch.Tensor, matrix: torch.Tensor, scheduler, checkpoint=False
):
    """Euler sampling over the scheduler's timesteps with the guided `velocity(x, matrix, t)`."""
    for i, t in enumerate(scheduler.timesteps):
        x = euler_step(scheduler, i, _step(velocity, checkpoint, x, matrix, t), t, x)
    return x


def _step(velocity: Callable[..., torch.Tensor], checkpoint: bool, *args: torch.Tensor) -> torch.Tensor:
    """
    One step's guided prediction; with `checkpoint`, through `torch.utils.checkpoint` at the step level: the
    recomputation during backward calls `velocity` again, which activates its own plan, so the head-PAG hooks see it
    (checkpointing single blocks would recompute them after the plan is gone).
    """
    if not checkpoint or not torch.is_grad_enabled():
        return velocity(*args)
    from torch.utils.checkpoint import checkpoint as run_checkpointed

    return run_checkpointed(velocity, *args, use_reentrant=False)


def euler_step(scheduler, i: int, v: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    r"""
    The flow-matching Euler step `x + (sigma_{i+1} - sigma_i) v` of `FlowMatchEulerDiscreteScheduler.step`, computed
    in float32 or better (the scheduler computes it in float32 even for float64 latents, which would make float64
    finite-difference checks meaningless); other schedulers (and stochastic sampling) use their own `step`.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler" or scheduler.config.get("stochastic_sampling"):
        return scheduler.step(v, t, latents, return_dict=False)[0]
    dtype = torch.promote_types(latents.dtype, torch.float32)
    dt = (sigmas[i + 1] - sigmas[i]).to(latents.device, dtype)
    return (latents.to(dtype) + dt * v.to(dtype)).to(latents.dtype)


def weight_matrix(
    num_layers: int, num_heads: int, selected: Sequence[Head], identity_weight: float, device=None
) -> torch.Tensor:
    """`(num_layers, num_heads)` weights: `identity_weight` on `selected`, 0 elsewhere (no grad)."""
    fixed = torch.zeros(num_layers, num_heads, dtype=torch.float32, device=device)
    for layer, head in selected:
        fixed[layer, head] = identity_weight
    return fixed


def objective_value(
    hunter,
    u: torch.Tensor,
    selected: Sequence[Head],
    candidates: Sequence[Head],
    prompt: str,
    seed: int,
    checkpoint: bool = False,
) -> torch.Tensor:
    r"""
    The objective (a 0-d tensor) of one pair, with the candidates' weights `u` (`(num_layers, num_heads)`; entries
    off the candidates are ignored) and the selected heads at the configured identity weight.
    """
    layout, c = hunter.layout, hunter.config
    fixed = weight_matrix(layout.num_layers, layout.num_heads, selected, c.pag_identity_weight, u.device)
    mask = torch.zeros_like(fixed)
    for layer, head in candidates:
        mask[layer, head] = 1.0
    matrix = fixed + mask * u
    heads = HeadSet([*selected, *candidates])
    image = render(hunter, matrix, heads, prompt, seed, c.grad_steps, checkpoint)
    score = hunter.objective(image, [prompt])
    if not isinstance(score, torch.Tensor) or score.shape != (1,):
        raise ValueError(f"A differentiable objective must return a (B,) tensor; got {score!r} for one image.")
    return score[0]


def head_gradients(
    hunter,
    selected: Sequence[Head],
    candidates: Sequence[Head],
    pairs: Sequence[tuple[str, int]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    checkpoint: bool | None = None,
) -> tuple[dict[Head, float], Cost]:
    r"""
    The mean over prompt-seed pairs of d objective / d u for every candidate at `u = 0`, and the work it took.

    Args:
        hunter ([`HeadHunter`]): Pipeline, settings (`grad_steps`, PAG settings), objective and row counter.
        selected (`list[tuple[int, int]]`): Heads selected in earlier rounds (fixed at the identity weight).
        candidates (`list[tuple[int, int]]`): The heads ranked.
        pairs (`list[tuple[str, int]]`, *optional*): Defaults to the config's M pairs.
        progress (`Callable`, *optional*): `(pairs done, total)`.
        checkpoint (`bool`, *optional*): Checkpoint each sampling step (keep only the step inputs; recompute the
            step during backward: about one more forward pass of work, not counted in the cost). Defaults to on
            for accelerators, off on CPU. Does not change the gradients.

    Returns:
        `(gradients, cost)`: `{head: mean gradient}` and a [`Cost`] whose row-evaluations count each forward row
        three times (backward as two forwards).
    """
    require_differentiable(hunter.objective)
    pairs = list(hunter.config.pairs() if pairs is None else pairs)
    layout = hunter.layout
    pipe = hunter.pipe
    device = pipe._execution_device
    if checkpoint is None:
        checkpoint = torch.device(device).type != "cpu"
    total = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float64)
    began, rows = time.perf_counter(), hunter.counter.rows
    modules = [pipe.transformer, pipe.vae, hunter.objective if isinstance(hunter.objective, torch.nn.Module) else None]
    for i, (prompt, seed) in enumerate(pairs):
        u = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float32, device=device, requires_grad=True)
        with torch.enable_grad(), hunter.lock, _frozen(*modules):
            with hunter.counter:  # forward rows only (a checkpointed step recomputed in backward is not counted)
                value = objective_value(hunter, u, selected, candidates, prompt, seed, checkpoint)
            (grad,) = torch.autograd.grad(value, u)
        total += grad.detach().double().cpu()
        if progress:
            progress(i + 1, len(pairs))
    forward_rows = hunter.counter.rows - rows
    cost = Cost(forward_rows * (1.0 + BACKWARD_FORWARDS), float(len(pairs)), time.perf_counter() - began)
    mean = total / len(pairs)
    return {(layer, head): float(mean[layer, head]) for layer, head in candidates}, cost


def read_gradients(
    hunter, round_index: int, candidates: Sequence[Head], selected: Sequence[Head]
) -> tuple[dict[Head, float], Cost] | None:
    """A round's gradient ranking and its cost when the run directory holds exactly this run's (else `None`)."""
    got = hunter.run_dir.read_gradients(round_index, candidates, selected, hunter.config.grad_steps)
    if isinstance(got, str):
        if hunter.state.is_main_process:
            logger.warning("%s: %s; the gradients are recomputed.", hunter.run_dir.gradients_path(round_index), got)
        return None
    return got


def gradient_ranking(hunter, round_index: int, selected: list[Head], candidates: list[Head]) -> dict[Head, float]:
    """
    The prefilter of the gradient strategy: every candidate's mean d objective / d identity weight, read back
    from the round's gradient file, or computed by the main process and written there first (so a resumed run
    keeps the very same prefilter and does not pay for it again).
    """
    if read_gradients(hunter, round_index, candidates, selected) is None and hunter.state.is_main_process:
        values, cost = head_gradients(hunter, selected, candidates, progress=hunter.progress)
        hunter.run_dir.write_gradients(round_index, selected, hunter.config.grad_steps, values, cost)
    hunter.state.wait_for_everyone()
    got = read_gradients(hunter, round_index, candidates, selected)
    if got is None:
        raise RuntimeError(f"{hunter.run_dir.gradients_path(round_index)} could not be read back.")
    return got[0]
