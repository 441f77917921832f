"""`head_pag(pipe, ...)`: head-level PAG for any diffusers pipeline with an SD3 or FLUX transformer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from diffusers.utils import logging

from ..guidance import HeadSet, Perturbation
from ..guidance.heads import HeadSetLike
from ..runtime import (
    CallPlan,
    TransformerLayout,
    activated,
    combining_at_step,
    describe_transformer,
    ensure_hooks,
    foreign_stateful_hooks,
)
from .policy import POLICIES, PAGOptions


logger = logging.get_logger(__name__)

# Built-in default head sets (all heads of one layer), see README "Default heads".
DEFAULT_LAYER = {"sd3": 7, "flux": 8}


def default_pag_heads(family: str, num_layers: int) -> HeadSet:
    """All heads of layer 7 (SD3 family) or 8 (FLUX); on smaller (test) models the middle layer."""
    layer = DEFAULT_LAYER[family]
    return HeadSet([layer if layer < num_layers else num_layers // 2])


def transformer_layout(pipe) -> TransformerLayout:
    """The layout of `pipe.transformer`, with a clear error for a pipeline without a supported transformer."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(
            f"head_pag needs a pipeline with a `transformer` component; {type(pipe).__name__} has none "
            "(supported: SD3Transformer2DModel and FluxTransformer2DModel pipelines)."
        )
    return describe_transformer(transformer)


def resolve_head_sets(
    pag_heads: HeadSetLike | Sequence[HeadSet], layout: TransformerLayout, default: HeadSet | None = None
) -> list[HeadSet]:
    """Resolve `pag_heads` (one head set, or a list of `HeadSet` objects, one per image) against the model."""
    if isinstance(pag_heads, (list, tuple)) and pag_heads and all(isinstance(h, HeadSet) for h in pag_heads):
        sets = list(pag_heads)
    elif pag_heads is None:
        sets = [default if default is not None else default_pag_heads(layout.family, layout.num_layers)]
    else:
        sets = [HeadSet.coerce(pag_heads)]
    return [hs.resolve(layout.num_layers, layout.num_heads) for hs in sets]


def check_caches(layout: TransformerLayout, options: PAGOptions | None = None) -> bool:
    r"""
    Whether diffusers caching hooks sit on the transformer, after refusing the combinations that cannot be exact.

    Caches keep one state per cache context (`"cond"`, `"uncond"`) and assume the batch of a context is the same at
    every step. With PAG the conditional call carries `n + p` rows at every step; prefix sharing (which changes the
    batch inside the block stack) is switched off, and a sequential perturbed call gets a context of its own. Refused:
    FasterCache on a model that is not guidance-distilled (it splits the batch into `[uncond, cond]` halves), and a
    batched PAG that skips steps (`pag_interval`, `pag_adaptive_scale`), which would change the batch between steps.
    """
    caches = foreign_stateful_hooks(layout.model)
    if not caches:
        return False
    names = ", ".join(caches)
    faster = caches.get("faster_cache_denoiser")
    if faster is not None and not getattr(faster, "is_guidance_distilled", True):
        raise ValueError(
            f"head_pag cannot run with FasterCache on a model that is not guidance-distilled (hooks: {names}): it "
            "splits every batch into [uncond, cond] halves, which the perturbed rows would break. Use "
            "FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig or PyramidAttentionBroadcastConfig, or "
            "disable the cache (`transformer.disable_cache()`)."
        )
    partial = options is not None and (options.interval != (0.0, 1.0) or options.adaptive_scale > 0)
    if partial and not options.sequential:
        raise ValueError(
            f"With diffusers caching hooks ({names}), PAG must act at every step or run sequentially: "
            f"pag_interval={options.interval} / pag_adaptive_scale={options.adaptive_scale} would change the "
            "batch a cache has stored between steps. Use pag_sequential=True (the perturbed branch then gets a "
            "cache of its own), the full interval, or disable the cache (`transformer.disable_cache()`)."
        )
    logger.info(f"head_pag with caching hooks ({names}): prefix sharing is off, caches see a constant batch.")
    return True


@contextlib.contextmanager
def head_pag(
    pipe,
    pag_heads: HeadSetLike | Sequence[HeadSet] = None,
    pag_scale: float = 3.0,
    pag_identity_weight: float = 1.0,
    pag_identity_scope: str = "joint",
    pag_target: str = "identity",
    pag_interval: tuple[float, float] = (0.0, 1.0),
    pag_adaptive_scale: float = 0.0,
    pag_sequential: bool | None = None,
    pag_share_prefix: bool = True,
) -> Iterator[None]:
    r"""
    Head-level perturbed-attention guidance for every call of `pipe` inside the `with` block.

    `v = [the pipeline's own guidance] + s (v_c - v_p)`, i.e. `v_u + g (v_c - v_u) + s (v_c - v_p)` plus any other
    term the pipeline adds (skip-layer guidance, true CFG), each with its own meaning: the PAG term joins the
    prediction at the scheduler step. `v_p` is the conditional prediction with the heads of `pag_heads` perturbed by
    SoftPAG, `A <- (1 - u) A + u I`, computed inside the installed attention processor.

    ```py
    >>> from diffusers import StableDiffusion3InpaintPipeline
    >>> from headpag import head_pag
    >>> with head_pag(pipe, pag_heads="11.15, 7", pag_scale=3.0, pag_identity_weight=0.5):
    ...     image = pipe(prompt, image=image, mask_image=mask).images[0]
    ```

    Works with any pipeline whose transformer is an `SD3Transformer2DModel` or a `FluxTransformer2DModel` (also when
    compiled). Everything is validated before the block runs; on exit the pipeline is exactly as it was (the hooks
    stay registered but inert, see `headpag.runtime.remove_hooks`).

    Args:
        pipe: A diffusers SD3 / SD3.5 / FLUX.1 pipeline.
        pag_heads (`HeadSet`, `str`, list of `(layer, head)` pairs or layer ints, *optional*):
            Heads to perturb, e.g. `"11.15, 7"`; a list of `HeadSet` objects gives every image its own set. `None`:
            the pipeline's default (`pipe.pag_heads` on headpag's classes, else all heads of layer 7 (SD3) / 8 (FLUX)).
        pag_scale (`float`, defaults to 3.0): PAG scale `s`; 0 leaves the pipeline untouched (no perturbed pass).
        pag_identity_weight (`float`, defaults to 1.0): SoftPAG's `u` in `[0, 1]`; 1 is PAG, 0 no perturbation.
        pag_identity_scope (`str`, defaults to `"joint"`): `"joint"` (the paper's) or `"image"` (diffusers').
        pag_target (`str`, defaults to `"identity"`): `"identity"`, `"uniform"` or `"query_mean"`.
        pag_interval (`tuple[float, float]`, defaults to `(0.0, 1.0)`): Fractions of the steps with PAG.
        pag_adaptive_scale (`float`, defaults to 0.0): diffusers' adaptive schedule `s - a (1000 - t)`, clamped at 0.
        pag_sequential (`bool`, *optional*): Run the perturbed rows as a second transformer call (lower peak memory);
            `None`: the pipeline's default (`False`).
        pag_share_prefix (`bool`, defaults to `True`): Compute the blocks before the first perturbed layer once.

    Raises:
        `ValueError`: for a bad argument (naming the value and what is allowed), an unsupported transformer, or a
            caching hook that cannot be combined exactly (see [`check_caches`]).
    """
    layout = transformer_layout(pipe)
    if pag_sequential is None:
        pag_sequential = bool(getattr(pipe, "_pag_sequential", False))
    options = PAGOptions(
        scale=pag_scale,
        perturbation=Perturbation(pag_identity_weight, pag_identity_scope, pag_target),
        interval=tuple(pag_interval),
        adaptive_scale=pag_adaptive_scale,
        sequential=bool(pag_sequential),
        share_prefix=bool(pag_share_prefix),
    )
    head_sets = resolve_head_sets(pag_heads, layout, getattr(pipe, "_pag_heads", None))
    if options.scale == 0 or not any(head_sets):
        yield
        return
    has_caches = check_caches(layout, options)
    plan = CallPlan(
        layout,
        head_sets,
        options.perturbation,
        POLICIES[layout.family](pipe, options),
        share_prefix=options.share_prefix and not has_caches,
        sequential=options.sequential,
        scheduler=pipe.scheduler,
        has_caches=has_caches,
    )
    ensure_hooks(plan)
    with combining_at_step(pipe.scheduler), activated(plan):
        yield
