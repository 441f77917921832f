"""
diffusers hooks that carry head-level PAG: registered once per transformer by name, inert outside an active call.

- `"headpag.rows"` on the transformer: a conditional call gets perturbed copies of its conditional rows (extra batch
  rows, or a second call when sequential), with every per-row input (ControlNet residuals, IP-Adapter embeddings,
  Kontext image tokens); it returns the clean output unchanged and leaves `s (v_c - v_p)` for the scheduler step.
- `"headpag.prefix"` on every block: the blocks before the first perturbed layer compute the clean rows once and copy
  them to the perturbed rows.
- `"headpag.attn"` on every attention module: SoftPAG inside the installed processor's attention call.

Hooks are registered through `diffusers.hooks.HookRegistry`, so they stack with offloading, layerwise casting and
other hooks; registering them once keeps `forward` stable for other threads and compiled models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager, _set_cache_context
from diffusers.utils import logging

from .attention import SoftPAGAttentionMode
from .layout import BLOCKS, TRANSFORMER_ARGUMENTS, TRANSFORMER_BATCH_ARGUMENTS, TransformerLayout, unwrap
from .plan import CallPlan, active_plan
from .rows import append_rows, bind, map_arguments, output_sample, replace_sample, take_rows


logger = logging.get_logger(__name__)

PREFIX = "headpag."
ROWS_HOOK = "headpag.rows"
PREFIX_HOOK = "headpag.prefix"
ATTENTION_HOOK = "headpag.attn"
_REGISTER_LOCK = threading.Lock()


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _Owned(ModelHook):
    """A hook that belongs to one transformer and acts only while that transformer's plan is active."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self._owner = weakref.ref(model)

    def plan(self) -> CallPlan | None:
        plan = active_plan()
        return plan if plan is not None and plan.model is self._owner() else None


class RowsHook(_Owned):
    r"""
    The transformer-level hook: adds the perturbed rows of a conditional call and computes the PAG term.

    It is stateful only to receive the pipeline's `cache_context` name (FLUX's `"cond"` / `"uncond"` calls).
    """

    _is_stateful = True

    def __init__(self, model: torch.nn.Module, layout: TransformerLayout):
        super().__init__(model)
        self.family = layout.family
        self.cache_context = StateManager(_NoState)

    def reset_state(self, module):
        self.cache_context.reset()
        return module

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        plan = self.plan()
        if plan is None:
            return forward(*args, **kwargs)
        kwargs = bind(TRANSFORMER_ARGUMENTS[self.family], args, kwargs)
        context = self.cache_context._context
        plan.cache_context = context
        decision = plan.decide(kwargs, None if context is None else context.name)
        if decision is None:
            return forward(**kwargs)
        try:
            if decision.in_place:
                plan.set_token_counts(kwargs)
                plan.batch = plan.batch_plan(0, kwargs["hidden_states"].shape[0])
                return forward(**kwargs)
            return run_perturbed(plan, forward, kwargs, decision.rows, decision.scale)
        finally:
            plan.reset_call()


def run_perturbed(plan: CallPlan, forward, kwargs: dict[str, Any], rows: list[int], scale: float):
    r"""
    Run one transformer call with perturbed copies of `rows`; return its clean output and set `plan.pending` to the
    PAG term `scale * (v_c - v_p)` of those rows.
    """
    hidden = kwargs["hidden_states"]
    n, p = hidden.shape[0], len(rows)
    index = torch.tensor(rows, dtype=torch.long, device=hidden.device)
    plan.set_token_counts(kwargs)
    batch_names = TRANSFORMER_BATCH_ARGUMENTS[plan.layout.family]
    share = plan.prefix_end > 0
    if not plan.sequential:
        plan.batch = plan.batch_plan(n, p)
        plan.prefix_mode = ("share", n, index) if share else None
        output = forward(**map_arguments(kwargs, batch_names, append_rows, n, index))
        sample = output_sample(output)
        clean, perturbed = sample[:n], sample[n:]
        output = replace_sample(output, clean)
    else:
        plan.batch = None
        plan.prefix_mode = ("record", index) if share else None
        output = forward(**kwargs)
        clean = output_sample(output)
        plan.batch = plan.batch_plan(0, p)
        plan.prefix_mode = ("replay",) if share else None
        with perturbed_cache_context(plan):
            perturbed = output_sample(forward(**map_arguments(kwargs, batch_names, take_rows, n, index)))
    plan.perturbed = perturbed
    plan.pending = scale * (clean.index_select(0, index) - perturbed.to(clean.dtype))
    return output


@contextlib.contextmanager
def perturbed_cache_context(plan: CallPlan) -> Iterator[None]:
    """
    The sequential perturbed call under a cache context of its own (`"<name>/headpag-perturbed"`), so that caching
    hooks keep its state apart from the clean call's; the pipeline's context is restored afterwards.
    """
    context = plan.cache_context
    if context is None or not plan.has_caches:
        yield
        return
    _set_cache_context(plan.model, dataclasses.replace(context, name=f"{context.name}/headpag-perturbed"))
    try:
        yield
    finally:
        _set_cache_context(plan.model, context)


class PrefixHook(_Owned):
    r"""
    Prefix sharing on block `index`: while the active plan shares its prefix, blocks before the first perturbed layer
    compute the clean rows only and copy them to the perturbed rows (batched), or record / replay them (sequential).
    """

    def __init__(self, model: torch.nn.Module, block: torch.nn.Module, index: int):
        super().__init__(model)
        self.index = index
        self.metadata = BLOCKS[type(block)]

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        plan = self.plan()
        if plan is None or plan.prefix_mode is None or self.index >= plan.prefix_end:
            return forward(*args, **kwargs)
        mode = plan.prefix_mode
        last = self.index == plan.prefix_end - 1
        if mode[0] == "share":  # rows [0, n) are computed; the perturbed rows are copies of rows `index`
            _, n, index = mode
            kwargs = bind(self.metadata.arguments, args, kwargs)
            clean = torch.arange(n, device=index.device)
            names = (*self.metadata.batch_arguments, "joint_attention_kwargs")
            out = forward(**map_arguments(kwargs, names, take_rows, n + len(index), clean))
            return tuple(append_rows(o, n, index) for o in out)
        if mode[0] == "record":  # sequential, clean call: keep what the perturbed call will need
            out = forward(*args, **kwargs)
            if last:
                plan.prefix_cache = tuple(take_rows(o, o.shape[0], mode[1]) if o is not None else o for o in out)
            return out
        # "replay": sequential, perturbed call: skip the prefix, hand over the recorded outputs at its end.
        if last:
            return plan.prefix_cache
        kwargs = bind(self.metadata.arguments, args, kwargs)
        return tuple(kwargs.get(name) for name in self.metadata.outputs)


class AttentionHook(_Owned):
    """SoftPAG inside attention module of layer `layer`, while the active plan perturbs rows in that layer."""

    def __init__(self, model: torch.nn.Module, layer: int):
        super().__init__(model)
        self.layer = layer

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        plan = self.plan()
        if plan is None or plan.batch is None or self.layer not in plan.perturbed_layers:
            return forward(*args, **kwargs)
        mode = SoftPAGAttentionMode(plan, self.layer)
        with mode:
            out = forward(*args, **kwargs)
        # A cache may serve an earlier (perturbed) output without calling attention: pyramid attention broadcast.
        expected = plan.batch.layer_weights(self.layer, out_device(out)) is not None and not plan.has_caches
        if expected and mode.perturbed == 0:
            backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
            raise RuntimeError(
                f"Layer {self.layer}: the attention processor {type(module.processor).__name__} did not call "
                f"torch.nn.functional.scaled_dot_product_attention (attention backend: {backend or 'unknown'}); "
                "head-level PAG needs the native attention backend."
            )
        return out


def ensure_hooks(plan: CallPlan) -> None:
    """
    Register the hooks that `plan` needs (thread-safe): the rows hook on the transformer, attention hooks on its
    perturbed layers, prefix hooks on the blocks before the first one. A module that already has its hook keeps it,
    so `forward`s change only the first time a module is needed, and modules PAG never touches carry no hook.
    """
    layout, model = plan.layout, plan.model
    wanted = [
        (block, PREFIX_HOOK, lambda b=block, i=index: PrefixHook(model, b, i))
        for index, block in enumerate(layout.blocks[: plan.prefix_end])
    ]
    for layer in sorted(plan.perturbed_layers):
        wanted += [
            (attn, ATTENTION_HOOK, lambda l=layer: AttentionHook(model, l)) for attn in layout.attentions[layer]
        ]
    wanted.append((model, ROWS_HOOK, lambda: RowsHook(model, layout)))
    with _REGISTER_LOCK:
        added = False
        for module, name, make in wanted:
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if registry.get_hook(name) is None:
                registry.register_hook(make(), name)
                added = True
            else:
                _revive(registry, name)
        if added:
            HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


def _revive(registry: HookRegistry, name: str) -> None:
    """
    Put a hook back in its module's call chain after an earlier hook was removed.

    `HookRegistry.remove_hook` (diffusers 0.42) hands the removed hook's inner forward to the *next* hook by
    overwriting that hook's `fn_ref.forward`; for a hook with `new_forward` (all of ours) that drops the hook from the
    chain instead of updating its `original_forward`. So `transformer.disable_cache()` after a head-PAG call would
    silently switch PAG off. Here the hook takes the forward it was bypassed with as its inner call again.
    """
    hook = registry.hooks[name]
    fn_ref = registry._fn_refs[registry._hook_order.index(name)]
    current = fn_ref.forward
    if isinstance(current, functools.partial) and current.func == hook.new_forward:
        return
    fn_ref.original_forward = current
    fn_ref.forward = functools.update_wrapper(
        functools.partial(hook.new_forward, registry._module_ref), hook.new_forward
    )


def remove_hooks(transformer: torch.nn.Module) -> None:
    """Remove every head-PAG hook from a transformer (they are inert anyway outside an active call)."""
    model = unwrap(transformer)
    with _REGISTER_LOCK:
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in (ROWS_HOOK, PREFIX_HOOK, ATTENTION_HOOK):
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


def out_device(output: Any) -> torch.device:
    first = output[0] if isinstance(output, tuple) else output
    return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")


def foreign_stateful_hooks(model: torch.nn.Module) -> dict[str, ModelHook]:
    """The stateful hooks (diffusers' caches) registered anywhere under `model`, other than ours, by name."""
    found: dict[str, ModelHook] = {}
    for _, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name, hook in registry.hooks.items():
            if hook._is_stateful and not name.startswith(PREFIX):
                found.setdefault(name, hook)
    return found
