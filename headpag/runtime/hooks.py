"""
The hooks that carry head-level PAG: registered once per module, inert outside an active call.

- On the transformer, a PyTorch forward pre-hook and forward hook (`register_forward_pre_hook(with_kwargs=True)`):
  a conditional call gets perturbed copies of its conditional rows (extra batch rows, or a second call when
  sequential), with every per-row input (ControlNet residuals, IP-Adapter embeddings, Kontext image tokens); it
  returns the clean output unchanged and leaves `s (v_c - v_p)` for the scheduler step. PyTorch keeps these hooks in
  the module's own hook dictionaries, which `nn.Module.__call__` runs whatever `forward` is at the time: accelerate's
  model CPU offload (which restores the `forward` it saved after every pipeline call), `remove_all_hooks()`,
  `del transformer.forward`, wrappers that tools set and remove, and class-level forward patches leave them in place.
- `"headpag.prefix"` on every block (diffusers `HookRegistry`): the blocks before the first perturbed layer compute
  the clean rows once and copy them to the perturbed rows.
- `"headpag.attn"` on every attention module (diffusers `HookRegistry`): SoftPAG inside the installed processor's
  attention call.

Nothing is assumed to stay attached: every perturbed transformer call counts the attention modules that perturbed
rows and raises when one was bypassed, and the scheduler step raises when a step of the PAG interval got no PAG
term (see [`~runtime.state.CallState`]).
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
from diffusers.utils import logging

from .attention import SoftPAGAttentionMode
from .layout import BLOCKS, TRANSFORMER_ARGUMENTS, TRANSFORMER_BATCH_ARGUMENTS, TransformerLayout, unwrap
from .plan import _ACTIVE, Activation, CallPlan, PerturbedCall, activation_for
from .rows import append_rows, bind, map_arguments, output_sample, replace_sample, take_rows
from .state import CallState, PrefixRecord, PrefixReplay, PrefixShare, RunningCall


logger = logging.get_logger(__name__)

PREFIX = "headpag."
PREFIX_HOOK = "headpag.prefix"
ATTENTION_HOOK = "headpag.attn"
_REGISTER_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------------------------
# Marked inputs: a guider's perturbed batch is recognised by its own `hidden_states` tensor object.


@dataclasses.dataclass
class Mark:
    """A tensor whose transformer call is perturbed in place with `plan`; `used` once a call perturbed it."""

    tensor: weakref.ref
    plan: CallPlan
    used: bool = False


_MARKS: dict[int, Mark] = {}


def mark_input(tensor: torch.Tensor, plan: CallPlan) -> Mark:
    r"""
    Register `tensor` (a fresh view made for this purpose) as the `hidden_states` of a transformer call whose every
    row is perturbed in place with `plan`. Nothing is activated: the mark lives as long as the tensor, so a run that
    fails cannot leave a plan behind, and no other call (another thread's, a stock one) ever passes that tensor.
    """
    key = id(tensor)
    mark = Mark(weakref.ref(tensor, lambda _, key=key: _MARKS.pop(key, None)), plan)
    _MARKS[key] = mark
    return mark


def _find_mark(model: torch.nn.Module, hidden: Any) -> Mark | None:
    mark = _MARKS.get(id(hidden)) if isinstance(hidden, torch.Tensor) else None
    if mark is None or mark.tensor() is not hidden or mark.plan.model is not model:
        return None
    return mark


# ---------------------------------------------------------------------------------------------------------------
# The transformer: PyTorch module hooks.


class TransformerHooks:
    r"""
    The transformer-level hooks: add the perturbed rows of a conditional call and compute the PAG term.

    `pre` decides (through the active plan's policy) and adds the perturbed rows; `post` splits the output, runs the
    sequential perturbed call if needed, checks that every perturbed attention module was reached and leaves the
    term in the call state.
    """

    def __init__(self, layout: TransformerLayout):
        self.family = layout.family
        self.handles: tuple[Any, Any] | None = None

    def attached(self, model: torch.nn.Module) -> bool:
        return self.handles is not None and all(
            handle.id in hooks for handle, hooks in zip(self.handles, (model._forward_pre_hooks, model._forward_hooks))
        )

    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        entry = activation_for(module)
        while entry is not None and entry.marked:  # a marked call that an interrupt left behind: over
            entry.state.end_transformer_call()
            entry = activation_for(module, entry.parent)
        if entry is None:
            return self._marked_call(module, args, kwargs) if _MARKS else None
        plan, state = entry.plan, entry.state
        if plan is None or (state is not None and state.reentrant):
            return None  # stock calls inside a `pag_scale=0` block; our own sequential perturbed call
        if state is None:
            raise RuntimeError(entry.held)
        state.end_transformer_call()
        kwargs = bind(TRANSFORMER_ARGUMENTS[self.family], args, kwargs)
        state.calls_in_step += 1
        decision = plan.decide(kwargs, state)
        if decision is None:
            return None
        if decision.in_place:
            state.call = RunningCall(decision)
            self._start_in_place(plan, state, kwargs)
            return (), kwargs
        hidden = kwargs["hidden_states"]
        n, p = hidden.shape[0], len(decision.rows)
        index = torch.tensor(decision.rows, dtype=torch.long, device=hidden.device)
        set_token_counts(plan, state, kwargs)
        share = plan.prefix_end > 0
        state.call = RunningCall(decision, index, kwargs)
        if plan.sequential:
            state.prefix = PrefixRecord(index) if share else None
            return (), kwargs
        state.start_batch(plan.batch_plan(n, p), n + p, hidden.device)
        state.prefix = PrefixShare(n, index) if share else None
        return (), map_arguments(kwargs, TRANSFORMER_BATCH_ARGUMENTS[self.family], append_rows, n, index)

    def _marked_call(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        """A guider's perturbed batch (see [`mark_input`]): every row perturbed in place, active for this call only."""
        kwargs = bind(TRANSFORMER_ARGUMENTS[self.family], args, kwargs)
        mark = _find_mark(module, kwargs.get("hidden_states"))
        if mark is None:
            return None
        state = CallState()
        token = _ACTIVE.set(Activation(module, mark.plan, state, marked=True, parent=_ACTIVE.get()))
        rows = list(range(kwargs["hidden_states"].shape[0]))
        state.call = RunningCall(PerturbedCall(rows, in_place=True), token=token, mark=mark)
        self._start_in_place(mark.plan, state, kwargs)
        return (), kwargs

    @staticmethod
    def _start_in_place(plan: CallPlan, state: CallState, kwargs: dict[str, Any]) -> None:
        set_token_counts(plan, state, kwargs)
        hidden = kwargs["hidden_states"]
        state.start_batch(plan.batch_plan(0, hidden.shape[0]), hidden.shape[0], hidden.device)

    def post(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        entry = activation_for(module)
        if entry is None or entry.state is None or entry.state.reentrant or entry.state.call is None:
            return None
        plan, state, call = entry.plan, entry.state, entry.state.call
        try:
            if output is None:  # the forward raised (PyTorch calls `always_call` hooks with no output)
                return None
            if call.decision.in_place:
                check_attention(plan, state)
                if call.mark is not None:
                    call.mark.used = True
                return None
            rows = output_sample(output).shape[0] - (0 if plan.sequential else len(call.index))
            if plan.sequential:
                clean = output_sample(output)
                perturbed = self._perturbed_call(module, plan, state, call, rows)
            else:
                check_attention(plan, state)
                sample = output_sample(output)
                clean, perturbed = sample[:rows], sample[rows:]
                output = replace_sample(output, clean)
            state.perturbed = perturbed
            state.set_term(call.decision.scale, clean.index_select(0, call.index) - perturbed.to(clean.dtype))
            return output
        finally:
            state.end_transformer_call()
            if call.token is not None:
                _ACTIVE.reset(call.token)

    def _perturbed_call(
        self, module: torch.nn.Module, plan: CallPlan, state: CallState, call: RunningCall, rows: int
    ) -> torch.Tensor:
        """The sequential branch: the perturbed rows as a call of their own, through `module(...)` (every hook)."""
        recorded = state.prefix
        state.end_transformer_call()
        state.call = call
        state.start_batch(plan.batch_plan(0, len(call.index)), len(call.index), call.index.device)
        if isinstance(recorded, PrefixRecord) and recorded.outputs is not None:
            state.prefix = PrefixReplay(recorded.outputs)
        state.reentrant = True
        batch_names = TRANSFORMER_BATCH_ARGUMENTS[self.family]
        with perturbed_cache_context(plan):
            output = module(**map_arguments(call.kwargs, batch_names, take_rows, rows, call.index))
        check_attention(plan, state)
        return output_sample(output)


def set_token_counts(plan: CallPlan, state: CallState, kwargs: dict[str, Any]) -> None:
    """Image and text token counts of a transformer call (for the image identity scope)."""
    text = kwargs.get("encoder_hidden_states")
    state.text_len = 0 if text is None else text.shape[1]
    state.image_len = plan.layout.image_tokens(kwargs["hidden_states"])


def check_attention(plan: CallPlan, state: CallState) -> None:
    """Raise when an attention module of a perturbed layer did not reach its head-PAG hook in this call."""
    expected = plan.attention_calls(state.weights)
    if state.attention_reached >= expected or plan.has_caches:  # a cache may serve attention without calling it
        return
    missing = []
    for layer in sorted(state.weights):
        for attn in plan.layout.attentions[layer]:
            if not _reaches(attn, ATTENTION_HOOK):
                forward = getattr(attn, "forward", None)
                missing.append(f"layer {layer} ({type(attn).__name__}.forward is now {qualname(forward)})")
    where = "; ".join(missing) or "an attention module was not called"
    raise RuntimeError(
        f"head-level PAG reached {state.attention_reached} of the {expected} perturbed attention calls of this "
        f"transformer call: {where}. Something replaced the attention modules' forward after headpag's hooks "
        "were installed; call `headpag.runtime.ensure_hooks` again or remove that patch."
    )


def qualname(function: Any) -> str:
    """A readable name of a (possibly `functools.partial`) callable, for messages about what replaced a forward."""
    inner = getattr(function, "func", function)
    return getattr(inner, "__qualname__", None) or repr(inner)


@contextlib.contextmanager
def perturbed_cache_context(plan: CallPlan) -> Iterator[None]:
    """
    The sequential perturbed call under a cache context of its own (`"<name>/headpag-perturbed"`), so that caching
    hooks keep its state apart from the clean call's; the pipeline's context is restored afterwards.
    """
    from diffusers.hooks.hooks import _set_cache_context

    context = current_cache_context(plan.model) if plan.has_caches else None
    if context is None:
        yield
        return
    _set_cache_context(plan.model, dataclasses.replace(context, name=f"{context.name}/headpag-perturbed"))
    try:
        yield
    finally:
        _set_cache_context(plan.model, context)


def current_cache_context(model: torch.nn.Module) -> Any:
    """The cache context the pipeline set on `model`'s caching hooks (`cache_context("cond")`), or `None`."""
    from diffusers.hooks.hooks import StateManager

    for hook in foreign_stateful_hooks(model).values():
        for attr in vars(hook).values():
            if isinstance(attr, StateManager) and attr._context is not None:
                return attr._context
    return None


# ---------------------------------------------------------------------------------------------------------------
# Blocks and attention modules: diffusers hooks.


class _Owned(ModelHook):
    """A hook that belongs to one transformer and acts only while that transformer's plan is running."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self._owner = weakref.ref(model)

    def state(self) -> tuple[CallPlan, CallState] | tuple[None, None]:
        entry = activation_for(self._owner())
        if entry is None or entry.plan is None or entry.state is None or entry.state.weights is None:
            return None, None
        return entry.plan, entry.state


class PrefixHook(_Owned):
    r"""
    Prefix sharing on block `index`: while the running call shares its prefix, blocks before the first perturbed
    layer compute the clean rows only and copy them to the perturbed rows (batched), or record / replay them
    (sequential).
    """

    def __init__(self, model: torch.nn.Module, block: torch.nn.Module, index: int):
        super().__init__(model)
        self.index = index
        self.metadata = BLOCKS[type(block)]

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        entry = activation_for(self._owner())
        state = None if entry is None else entry.state
        mode = None if state is None else state.prefix
        if mode is None or self.index >= entry.plan.prefix_end:
            return forward(*args, **kwargs)
        last = self.index == entry.plan.prefix_end - 1
        if isinstance(mode, PrefixShare):  # rows [0, n) are computed; the perturbed rows are copies of rows `index`
            kwargs = bind(self.metadata.arguments, args, kwargs)
            clean = torch.arange(mode.n, device=mode.index.device)
            names = (*self.metadata.batch_arguments, "joint_attention_kwargs")
            out = forward(**map_arguments(kwargs, names, take_rows, mode.n + len(mode.index), clean))
            return tuple(append_rows(o, mode.n, mode.index) for o in out)
        if isinstance(mode, PrefixRecord):  # sequential, clean call: keep what the perturbed call will need
            out = forward(*args, **kwargs)
            if last:
                outputs = tuple(take_rows(o, o.shape[0], mode.index) if o is not None else o for o in out)
                state.prefix = dataclasses.replace(mode, outputs=outputs)
            return out
        # PrefixReplay: sequential, perturbed call: skip the prefix, hand over the recorded outputs at its end.
        if last:
            return mode.outputs
        kwargs = bind(self.metadata.arguments, args, kwargs)
        return tuple(kwargs.get(name) for name in self.metadata.outputs)


class AttentionHook(_Owned):
    """SoftPAG inside the attention module of layer `layer`, while the running call perturbs rows in that layer."""

    def __init__(self, model: torch.nn.Module, layer: int):
        super().__init__(model)
        self.layer = layer

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        plan, state = self.state()
        if state is None or self.layer not in state.weights:
            return forward(*args, **kwargs)
        state.attention_reached += 1
        processor = getattr(module, "processor", None)
        mode = SoftPAGAttentionMode(plan, state, self.layer, type(processor).__name__)
        with mode:
            out = forward(*args, **kwargs)
        # A cache may serve an earlier (perturbed) output without calling attention: pyramid attention broadcast.
        if mode.perturbed == 0 and not plan.has_caches:
            backend = getattr(processor, "_attention_backend", None)
            raise RuntimeError(
                f"Layer {self.layer}: the attention processor {type(processor).__name__} did not call "
                f"torch.nn.functional.scaled_dot_product_attention (attention backend: {backend or 'unknown'}); "
                "head-level PAG needs the native attention backend."
            )
        return out


# ---------------------------------------------------------------------------------------------------------------
# Registration.

_TRANSFORMER_HOOKS: weakref.WeakKeyDictionary[torch.nn.Module, TransformerHooks] = weakref.WeakKeyDictionary()


def ensure_hooks(plan: CallPlan) -> None:
    """
    Register the hooks that `plan` needs (thread-safe, idempotent): the transformer hooks, attention hooks on its
    perturbed layers, prefix hooks on the blocks before the first one. A module that already has its hook keeps it
    (a hook that diffusers' `remove_hook` cut out of the chain is put back), so `forward`s change only the first
    time a module is needed, and modules PAG never touches carry no hook.
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
    with _REGISTER_LOCK:
        hooks = _TRANSFORMER_HOOKS.get(model)
        if hooks is None or not hooks.attached(model):
            if hooks is not None and hooks.handles is not None:
                for handle in hooks.handles:
                    handle.remove()
            hooks = TransformerHooks(layout)
            hooks.handles = (
                model.register_forward_pre_hook(torch.compiler.disable(hooks.pre), with_kwargs=True, prepend=True),
                model.register_forward_hook(
                    torch.compiler.disable(hooks.post), with_kwargs=True, prepend=True, always_call=True
                ),
            )
            _TRANSFORMER_HOOKS[model] = hooks
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


def transformer_attached(model: torch.nn.Module) -> bool:
    """Whether headpag's transformer hooks are registered on `model` (a tool may have cleared its hook dicts)."""
    hooks = _TRANSFORMER_HOOKS.get(model)
    return hooks is not None and hooks.attached(model)


def _reaches(module: torch.nn.Module, name: str) -> bool:
    """Whether `module.forward` is still the head of its registry's chain, with hook `name` in it."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return False
    current = module.__dict__.get("forward")
    return getattr(current, "func", None) is not None and getattr(current.func, "__name__", "") == "new_forward"


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
        hooks = _TRANSFORMER_HOOKS.pop(model, None)
        if hooks is not None and hooks.handles is not None:
            for handle in hooks.handles:
                handle.remove()
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in (PREFIX_HOOK, ATTENTION_HOOK):
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


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
