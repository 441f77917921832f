"""
`head_pag(pipe, ...)`: head-level PAG for any diffusers pipeline with an SD3 or FLUX transformer.

The life of a block, followed as data:

1. Entry validates every argument, resolves the head set, compiles the [`~runtime.CallPlan`] and registers the
   block for `pipe` in the current context (innermost block of a pipeline wins; explicit call arguments of our
   classes beat the block's). While a block is open the transformer is *held*: a transformer call outside the
   pipeline's own denoising loop raises instead of running stock or half-perturbed.
2. Each pipeline call's denoising loop (`with self.progress_bar(total=...)`, which every SD3 / FLUX pipeline runs
   around it) starts a [`~runtime.CallState`]: the PAG scale of each of its steps, the scheduler the pipeline has
   *now* (its `step` adds the PAG term), and the transformer hooks checked again.
3. Every step inside the interval must receive its PAG term at `scheduler.step`, or the call raises there.
4. Exit restores the pipeline exactly (the hooks stay registered but inert).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from diffusers.utils import logging

from ..guidance import HeadSet, Perturbation
from ..guidance.heads import HeadSetLike
from ..runtime import (
    CallPlan,
    CallState,
    TransformerLayout,
    activated,
    combining_at_step,
    describe_transformer,
    ensure_hooks,
    foreign_stateful_hooks,
    qualname,
    transformer_attached,
    unwrap,
)
from .model_config import over_builtin, recommended
from .policy import POLICIES, PAGOptions, loop_plan


logger = logging.get_logger(__name__)

# Built-in default head sets (all heads of one layer), see docs/scripting.md, "Default heads".
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
    """
    Resolve `pag_heads` (one head set, or a list of `HeadSet` objects, one per image) against the model.

    A list of spec strings is refused: it is ambiguous (one set, or one set per image?).
    """
    if isinstance(pag_heads, (list, tuple)) and any(isinstance(h, str) for h in pag_heads):
        raise ValueError(
            f"pag_heads={list(pag_heads)!r} is a list of spec strings, which is ambiguous. Pass one spec string for "
            "one head set (e.g. '1.0, 2, 0.1'), or a list of HeadSet objects for one head set per image "
            "([HeadSet.parse(spec) for spec in specs])."
        )
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
    batched PAG that skips steps (`pag_interval`, `pag_adaptive_scale`, `pag_reuse`), which would change the batch
    between steps.
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
    partial = options is not None and (
        options.interval != (0.0, 1.0) or options.adaptive_scale > 0 or options.reuse > 1
    )
    if partial and not options.sequential:
        raise ValueError(
            f"With diffusers caching hooks ({names}), PAG must act at every step or run sequentially: "
            f"pag_interval={options.interval} / pag_adaptive_scale={options.adaptive_scale} / "
            f"pag_reuse={options.reuse} would change the batch a cache has stored between steps. Use "
            "pag_sequential=True (the perturbed branch then gets a cache of its own), the full interval, or disable "
            "the cache (`transformer.disable_cache()`)."
        )
    logger.info(f"head_pag with caching hooks ({names}): prefix sharing is off, caches see a constant batch.")
    return True


@dataclass(eq=False)
class Block:
    r"""
    An open `with head_pag(pipe, ...)` block.

    Args:
        pipe: The pipeline.
        arguments (`dict`): The block's `pag_*` arguments (our classes merge their call's explicit ones over them).
        plan ([`~runtime.CallPlan`], *optional*): `None` when the block applies no PAG (`pag_scale=0`, no heads).
        options ([`PAGOptions`], *optional*): The validated options.
    """

    pipe: Any
    arguments: dict[str, Any]
    plan: CallPlan | None
    options: PAGOptions | None
    warned: bool = False


_BLOCKS: contextvars.ContextVar[tuple[Block, ...]] = contextvars.ContextVar("headpag_blocks", default=())
_OPEN: dict[int, list[Block]] = {}  # id(pipe) -> its open blocks, in every context (for the executor warning)
_OPEN_LOCK = threading.Lock()
_SAVED = "_headpag_saved_progress_bar"


def open_block(pipe) -> Block | None:
    """The innermost `head_pag` block of `pipe` open in the current context, or `None`."""
    for block in reversed(_BLOCKS.get()):
        if block.pipe is pipe:
            return block
    return None


class PAGLoop:
    r"""
    The pipeline's progress bar around its denoising loop, running the block's plan for the loop's length: a fresh
    [`~runtime.CallState`], the scheduler's `step` combining, and on a normal exit the check that no PAG term was
    left unadded. Everything else is the progress bar's.
    """

    def __init__(self, bar: Any, block: Block, total: int | None):
        self.bar = bar
        self.block = block
        self.total = total
        self.stack = contextlib.ExitStack()
        self.state: CallState | None = None

    def __enter__(self):
        pipe, plan = self.block.pipe, self.block.plan
        if unwrap(getattr(pipe, "transformer", None)) is not plan.model:
            raise RuntimeError(
                f"pipe.transformer was replaced inside `with head_pag(pipe)` (it is now a "
                f"{type(pipe.transformer).__name__}, not the transformer the block was opened for); open the block "
                "after setting the pipeline's components."
            )
        ensure_hooks(plan)
        scheduler = pipe.scheduler
        scales, fresh = loop_plan(pipe, self.block.options, self.total)
        self.state = CallState(
            scales=scales,
            fresh_steps=fresh,
            scheduler=scheduler,
            explain=functools.partial(_explain, pipe, plan, scheduler),
        )
        with contextlib.ExitStack() as stack:
            stack.enter_context(combining_at_step(scheduler))
            stack.enter_context(activated(plan, self.state))
            result = self.bar.__enter__()
            self.stack = stack.pop_all()
        return result

    def __exit__(self, *exc: Any):
        try:
            handled = self.bar.__exit__(*exc)
        finally:
            self.stack.close()
        if exc[0] is None:
            self.state.check_finished()
        return handled

    def __iter__(self):
        return iter(self.bar)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bar, name)


def _explain(pipe, plan: CallPlan, scheduler: Any) -> str:
    """What is different from when the loop started: the likely cause of a missing PAG term."""
    causes = []
    if unwrap(getattr(pipe, "transformer", None)) is not plan.model:
        causes.append(
            f"pipe.transformer is now a {type(pipe.transformer).__name__}, not the transformer headpag hooked"
        )
    if not transformer_attached(plan.model):
        causes.append("headpag's forward hooks were removed from the transformer (its `_forward_pre_hooks`)")
    if pipe.scheduler is not scheduler:
        causes.append(
            f"pipe.scheduler was replaced during the loop (now a {type(pipe.scheduler).__name__}); headpag adds the "
            "PAG term in the `step` of the scheduler the loop started with"
        )
    if not causes:
        name = qualname(getattr(plan.model, "forward", None))
        causes.append(
            "the transformer was not called through `transformer(...)` (nn.Module.__call__ runs headpag's hooks; "
            f"its forward is now {name}): a wrapper that calls `forward` directly bypasses head-level PAG"
        )
    return "Likely cause: " + "; ".join(causes) + "."


def _progress_bar(pipe, *args, **kwargs):
    """`pipe.progress_bar` while a block on `pipe` is open (in any context)."""
    saved = pipe.__dict__.get(_SAVED)
    bar = saved(*args, **kwargs) if saved is not None else type(pipe).progress_bar(pipe, *args, **kwargs)
    block = open_block(pipe)
    if block is None:
        warn_outside_context(pipe)
        return bar
    if block.plan is None:
        return bar
    return PAGLoop(bar, block, kwargs.get("total"))


def warn_outside_context(pipe, consequence: str = "runs WITHOUT head-level PAG") -> None:
    """Warn once per open block of `pipe` that a call of `pipe` runs in a context without it."""
    with _OPEN_LOCK:
        blocks = [b for b in _OPEN.get(id(pipe), []) if not b.warned]
        for block in blocks:
            block.warned = True
    for _ in blocks:
        logger.warning(
            f"{type(pipe).__name__} was called from a context without its open `with head_pag(...)` block (another "
            f"thread or an executor: they do not inherit the block), so this call {consequence}. Run the call in "
            "the block's context: `ctx = contextvars.copy_context()` inside the block, then "
            "`executor.submit(ctx.run, pipe, ...)`, or `await asyncio.to_thread(pipe, ...)` (which copies it)."
        )


@contextlib.contextmanager
def _registered(block: Block) -> Iterator[None]:
    """Register `block` in the current context and on its pipeline (whose `progress_bar` then runs the plan)."""
    pipe = block.pipe
    with _OPEN_LOCK:
        blocks = _OPEN.setdefault(id(pipe), [])
        if not blocks:
            pipe.__dict__[_SAVED] = pipe.__dict__.get("progress_bar")
            pipe.__dict__["progress_bar"] = functools.partial(_progress_bar, pipe)
        blocks.append(block)
    token = _BLOCKS.set((*_BLOCKS.get(), block))
    try:
        yield
    finally:
        _BLOCKS.reset(token)
        with _OPEN_LOCK:
            blocks = _OPEN[id(pipe)]
            blocks.remove(block)
            if not blocks:
                del _OPEN[id(pipe)]
                saved = pipe.__dict__.pop(_SAVED)
                if saved is None:
                    pipe.__dict__.pop("progress_bar", None)
                else:
                    pipe.__dict__["progress_bar"] = saved


HELD = (
    "A call of {model} inside `with head_pag(pipe)` that is not part of a pipeline call of that pipeline (a "
    "hand-written denoising loop?): head_pag applies PAG inside the pipeline's own denoising loop only, and refuses "
    "to run a transformer call it cannot count. Call the pipeline inside the block, or use "
    "`headpag.runtime.perturbed_forward` for one transformer call with perturbed rows."
)


@contextlib.contextmanager
def head_pag(
    pipe,
    pag_heads: HeadSetLike | Sequence[HeadSet] = None,
    pag_scale: float | None = None,
    pag_identity_weight: float | None = None,
    pag_identity_scope: str | None = None,
    pag_target: str | None = None,
    pag_interval: tuple[float, float] | None = None,
    pag_adaptive_scale: float | None = None,
    pag_sequential: bool | None = None,
    pag_share_prefix: bool | None = None,
    pag_reuse: int | None = None,
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
    compiled or offloaded). Everything is validated before the block runs. Every step inside `pag_interval` must get
    its PAG term or the call raises a `RuntimeError` at that step, naming the likely cause: a call never silently
    returns a stock image. The block applies to calls of `pipe` made in the current context (thread, task); a call
    of `pipe` from another thread or an executor runs without PAG and logs a warning once per block (run it with
    `contextvars.copy_context().run` or `asyncio.to_thread`). Inside the block, the transformer may only be called
    by the pipeline's denoising loop; a hand-written loop raises (use `headpag.runtime.perturbed_forward`). On exit
    the pipeline is exactly as it was (the hooks stay registered but inert, see `headpag.runtime.remove_hooks`).

    An argument left at `None` takes the model's recommendation, else the default named below: `pag_heads`,
    `pag_sequential` and the `pag` section of the `headpag_config.json` of the model's folder (see
    [`~pipelines.model_config`]), kept by headpag's classes and read from `pipe.name_or_path` for a stock pipeline
    loaded from a local folder. An explicit `pag_scale=0` reads nothing and leaves the pipeline untouched.

    Args:
        pipe: A diffusers SD3 / SD3.5 / FLUX.1 pipeline.
        pag_heads (`HeadSet`, `str`, list of `(layer, head)` pairs or layer ints, *optional*):
            Heads to perturb, e.g. `"11.15, 7"`; a list of `HeadSet` objects gives every image its own set (a list
            of spec strings is refused as ambiguous). `None`: the pipeline's default (`pipe.pag_heads` on
            headpag's classes, else all heads of layer 7 (SD3) / 8 (FLUX)).
        pag_scale (`float`, defaults to 3.0): PAG scale `s`; 0 leaves the pipeline untouched (no perturbed pass).
        pag_identity_weight (`float`, defaults to 1.0): SoftPAG's `u` in `[0, 1]`; 1 is PAG, 0 no perturbation.
        pag_identity_scope (`str`, defaults to `"joint"`): `"joint"` (the paper's) or `"image"` (diffusers').
        pag_target (`str`, defaults to `"identity"`): `"identity"`, `"uniform"` or `"query_mean"`.
        pag_interval (`tuple[float, float]`, defaults to `(0.0, 1.0)`): Fractions of the steps with PAG.
        pag_adaptive_scale (`float`, defaults to 0.0): diffusers' adaptive schedule `s - a (1000 - t)`, clamped at 0.
        pag_sequential (`bool`, *optional*): Run the perturbed rows as a second transformer call (lower peak memory);
            `None`: the pipeline's default (`False`).
        pag_share_prefix (`bool`, defaults to `True`): Compute the blocks before the first perturbed layer once.
        pag_reuse (`int`, defaults to 1): Run the perturbed branch on steps 0, k, 2k, ... of the interval only; the
            steps in between reuse the last computed `v_c - v_p`, times their own scale (adaptive scale included).
            1 is PAG on every step, bit for bit; k costs about one extra pass every k steps.

    Raises:
        `ValueError`: for a bad argument (naming the value and what is allowed), an unsupported transformer, or a
            caching hook that cannot be combined exactly (see [`check_caches`]).
        `RuntimeError`: during a call, at the first step inside `pag_interval` that did not get its PAG term.
    """
    given = dict(
        pag_scale=pag_scale,
        pag_identity_weight=pag_identity_weight,
        pag_identity_scope=pag_identity_scope,
        pag_target=pag_target,
        pag_interval=pag_interval,
        pag_adaptive_scale=pag_adaptive_scale,
        pag_share_prefix=pag_share_prefix,
        pag_reuse=pag_reuse,
    )
    # the block keeps what it was given: a call inside it resolves the rest as the block does
    arguments = dict(pag_heads=pag_heads, pag_sequential=pag_sequential, **given)
    model = {} if pag_scale == 0 else recommended(pipe)  # pag_scale=0: the parent pipeline, whatever the folder says
    defaults = over_builtin(model)
    v = {name: defaults[name] if value is None else value for name, value in given.items()}
    layout = transformer_layout(pipe)
    if pag_sequential is None:
        pag_sequential = bool(model.get("pag_sequential", False))
    options = PAGOptions(
        scale=v["pag_scale"],
        perturbation=Perturbation(v["pag_identity_weight"], v["pag_identity_scope"], v["pag_target"]),
        interval=tuple(v["pag_interval"]),
        adaptive_scale=v["pag_adaptive_scale"],
        sequential=bool(pag_sequential),
        share_prefix=bool(v["pag_share_prefix"]),
        reuse=v["pag_reuse"],
    )
    default_heads = model.get("pag_heads")
    head_sets = resolve_head_sets(pag_heads, layout, None if default_heads is None else HeadSet.coerce(default_heads))
    if options.scale == 0 or not any(head_sets):
        with _registered(Block(pipe, arguments, None, None)), activated(None, model=layout.model):
            yield
        return
    has_caches = check_caches(layout, options)
    plan = CallPlan(
        layout,
        head_sets,
        options.perturbation,
        POLICIES[layout.family](pipe),
        share_prefix=options.share_prefix and not has_caches,
        sequential=options.sequential,
        has_caches=has_caches,
    )
    ensure_hooks(plan)
    held = HELD.format(model=type(layout.model).__name__)
    with _registered(Block(pipe, arguments, plan, options)), activated(plan, held=held):
        yield
