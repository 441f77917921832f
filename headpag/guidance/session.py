"""
Running a diffusers transformer with perturbed rows: install the processors, share the unperturbed prefix, and
leave the model exactly as it was afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers.utils import logging

from .heads import HeadSet, HeadSetLike
from .models import describe_transformer
from .plan import PerturbationPlan, PerturbationState
from .processors import HeadPAGFluxAttnProcessor, HeadPAGJointAttnProcessor
from .softpag import Perturbation


logger = logging.get_logger(__name__)

# Transformer-call keyword arguments that carry one row per batch element (SD3 and FLUX).
BATCH_KWARGS = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "guidance")
# Block arguments that carry one row per batch element.
BLOCK_BATCH_ARGS = ("hidden_states", "encoder_hidden_states", "temb")


def output_sample(output: Any) -> torch.Tensor:
    """The sample tensor of a transformer output (`tuple` or `Transformer2DModelOutput`)."""
    return output[0] if isinstance(output, tuple) else output.sample


def replace_sample(output: Any, sample: torch.Tensor) -> Any:
    """The same kind of transformer output with its sample replaced."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output


@contextlib.contextmanager
def overridden(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set an instance attribute (e.g. a module's `forward`) for a `with` block; restore exactly what was there."""
    had_own = name in obj.__dict__
    previous = obj.__dict__.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


class PerturbedTransformer:
    r"""
    Head-level SoftPAG on a diffusers SD3/SD3.5/FLUX transformer, for the duration of a `with` block.

    ```py
    pt = PerturbedTransformer(pipe.transformer, Perturbation(identity_weight=0.5))
    heads = [pt.resolve("11.15, 7")]
    with pt.installed(heads):
        clean, perturbed = pt.run(pipe.transformer.forward, call_kwargs, source_rows=[1], head_sets=heads)
    ```

    Args:
        transformer (`nn.Module`): `SD3Transformer2DModel` or `FluxTransformer2DModel`.
        perturbation ([`Perturbation`]): Identity weight, scope and target.
        share_prefix (`bool`, defaults to `True`):
            Compute the blocks before the first perturbed layer once for a clean row and its perturbed copies.
        sequential (`bool`, defaults to `False`):
            Run the perturbed rows as a second transformer call instead of extra rows of the same call (less peak
            memory, more launches).
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        perturbation: Perturbation | None = None,
        share_prefix: bool = True,
        sequential: bool = False,
    ):
        self.transformer = transformer
        self.layout = describe_transformer(transformer)
        self.perturbation = perturbation or Perturbation()
        self.share_prefix = share_prefix
        self.sequential = sequential
        self.state = PerturbationState()
        self._head_sets: list[HeadSet] | None = None
        self._prefix_end = 0  # blocks [0, _prefix_end) are shared
        self._prefix_mode: tuple | None = None
        self._prefix_cache: tuple | None = None

    # ------------------------------------------------------------------ heads
    def resolve(self, heads: HeadSetLike) -> HeadSet:
        """Resolve a head set (spec string, pairs, layers or `HeadSet`) against this model's layers and heads."""
        return HeadSet.coerce(heads).resolve(self.layout.num_layers, self.layout.num_heads)

    # ------------------------------------------------------------------ install / restore
    @contextlib.contextmanager
    def installed(self, head_sets: Sequence[HeadSet]) -> Iterator[PerturbedTransformer]:
        """
        Install the head-PAG processors on every layer that one of `head_sets` touches (and the prefix-sharing
        wrappers on the blocks before the first one); restore the original processors and forwards on exit, also
        when the body raises.
        """
        layers = sorted({layer for hs in head_sets for layer in hs.layers()})
        saved_processors: list[tuple[torch.nn.Module, Any]] = []
        try:
            with contextlib.ExitStack() as forwards:
                for layer in layers:
                    for attn in self.layout.attentions[layer]:
                        saved_processors.append((attn, attn.processor))
                        if self.layout.family == "sd3":
                            processor = HeadPAGJointAttnProcessor(layer, self.state)
                        else:
                            processor = HeadPAGFluxAttnProcessor(layer, self.state, original=attn.processor)
                        attn.set_processor(processor)
                self._prefix_end = layers[0] if (layers and self.share_prefix) else 0
                for index in range(self._prefix_end):
                    block = self.layout.blocks[index]
                    wrapper = functools.partial(self._block_forward, block.forward, index)
                    forwards.enter_context(overridden(block, "forward", wrapper))
                self._head_sets = list(head_sets)
                yield self
        finally:
            for attn, processor in reversed(saved_processors):
                attn.set_processor(processor)
            self._head_sets = None
            self._prefix_end = 0
            self._prefix_mode = None
            self._prefix_cache = None
            self.state.plan = None
            self.state.text_len = None

    # ------------------------------------------------------------------ prefix sharing
    def _block_forward(self, original: Callable, index: int, *args, **kwargs):
        mode = self._prefix_mode
        if mode is None:
            return original(*args, **kwargs)
        bound = inspect.signature(original).bind(*args, **kwargs)
        last = index == self._prefix_end - 1
        if mode[0] == "share":  # rows [0, n) are computed; perturbed rows are copies of rows `src`
            _, n, src = mode
            for name in BLOCK_BATCH_ARGS:
                value = bound.arguments.get(name)
                if isinstance(value, torch.Tensor):
                    bound.arguments[name] = value[:n]
            out = original(*bound.args, **bound.kwargs)
            return tuple(torch.cat([o, o[src]]) if isinstance(o, torch.Tensor) else o for o in out)
        if mode[0] == "record":  # sequential, clean call: keep what the perturbed call will need
            out = original(*args, **kwargs)
            if last:
                self._prefix_cache = tuple(o[mode[1]] if isinstance(o, torch.Tensor) else o for o in out)
            return out
        # "replay": sequential, perturbed call. Blocks return (encoder_hidden_states, hidden_states).
        if last:
            return self._prefix_cache
        return bound.arguments.get("encoder_hidden_states"), bound.arguments.get("hidden_states")

    # ------------------------------------------------------------------ running
    def run(
        self,
        forward: Callable[..., Any],
        kwargs: dict[str, Any],
        source_rows: Sequence[int],
        head_sets: Sequence[HeadSet] | None = None,
    ) -> tuple[Any, torch.Tensor]:
        r"""
        Run one transformer call with perturbed copies of some rows.

        Args:
            forward (`Callable`): The transformer's forward (called with keyword arguments).
            kwargs (`dict`): The call's keyword arguments, with `n` rows in each batch tensor.
            source_rows (`Sequence[int]`): For each perturbed copy, the clean row it copies.
            head_sets (`Sequence[HeadSet]`, *optional*): Resolved head set of each copy; defaults to the sets given
                to [`~PerturbedTransformer.installed`] (one, or one per copy).

        Returns:
            `(output, perturbed)`: the transformer output for the `n` clean rows, exactly as an unperturbed call
            would give it (up to batch-size effects of the kernels), and the perturbed sample, one row per copy.
        """
        if self._head_sets is None:
            raise RuntimeError("PerturbedTransformer.run() must be called inside `with pt.installed(...)`.")
        head_sets = list(head_sets if head_sets is not None else self._head_sets)
        if len(head_sets) == 1 and len(source_rows) > 1:
            head_sets = head_sets * len(source_rows)
        if len(head_sets) != len(source_rows):
            raise ValueError(f"Got {len(source_rows)} perturbed rows but {len(head_sets)} head sets.")
        n = kwargs["hidden_states"].shape[0]
        device = kwargs["hidden_states"].device
        src = torch.tensor(list(source_rows), dtype=torch.long, device=device)
        p = len(source_rows)
        text = kwargs.get("encoder_hidden_states")
        self.state.text_len = None if text is None else text.shape[1]
        num_heads = self.layout.num_heads

        def take(rows: torch.Tensor) -> dict[str, Any]:
            out = dict(kwargs)
            for name in BATCH_KWARGS:
                value = kwargs.get(name)
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
                    out[name] = value[rows] if self.sequential else torch.cat([value, value[rows]])
            return out

        share = self._prefix_end > 0
        try:
            if not self.sequential:
                self.state.plan = PerturbationPlan(range(n, n + p), head_sets, self.perturbation, num_heads)
                self._prefix_mode = ("share", n, src) if share else None
                output = forward(**take(src))
                sample = output_sample(output)
                return replace_sample(output, sample[:n]), sample[n:]
            self.state.plan = None
            self._prefix_mode = ("record", src) if share else None
            output = forward(**kwargs)
            self.state.plan = PerturbationPlan(range(p), head_sets, self.perturbation, num_heads)
            self._prefix_mode = ("replay",) if share else None
            perturbed = output_sample(forward(**take(src)))
            return output, perturbed
        finally:
            self.state.plan = None
            self._prefix_mode = None
            self._prefix_cache = None
