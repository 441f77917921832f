"""Batch rows of transformer and block inputs: select rows, or append perturbed copies of some rows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def map_batch(value: Any, batch: int, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    r"""
    `value` with `function` applied to every tensor whose leading dimension is `batch`.

    Walks lists, tuples and dicts (ControlNet residual lists, `joint_attention_kwargs` with IP-Adapter embeddings);
    anything else (floats, ids, rotary embeddings, tensors of another leading size) is returned unchanged.
    """
    if isinstance(value, torch.Tensor):
        return function(value) if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)):
        return type(value)(map_batch(v, batch, function) for v in value)
    if isinstance(value, dict):
        return {k: map_batch(v, batch, function) for k, v in value.items()}
    return value


def take_rows(value: Any, batch: int, index: torch.Tensor) -> Any:
    """`value` with only the rows `index` of every batch tensor (see [`map_batch`])."""
    return map_batch(value, batch, lambda t: t.index_select(0, index.to(t.device)))


def append_rows(value: Any, batch: int, index: torch.Tensor) -> Any:
    """`value` with copies of rows `index` appended (`cat([x, x[index]])`) to every batch tensor."""
    return map_batch(value, batch, lambda t: torch.cat([t, t.index_select(0, index.to(t.device))]))


def map_arguments(kwargs: dict[str, Any], names: Iterable[str], function, *args) -> dict[str, Any]:
    """A copy of `kwargs` with `function(value, *args)` applied to the arguments `names` (others are shared)."""
    out = dict(kwargs)
    for name in names:
        if out.get(name) is not None:
            out[name] = function(out[name], *args)
    return out


def bind(names: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional `args` named by `names` (a forward's parameter order from the layout table), merged with `kwargs`."""
    if len(args) > len(names):
        raise TypeError(f"Got {len(args)} positional arguments; this forward takes at most {len(names)}.")
    bound = dict(zip(names, args))
    duplicated = set(bound) & set(kwargs)
    if duplicated:
        raise TypeError(f"Got multiple values for argument(s) {sorted(duplicated)}.")
    bound.update(kwargs)
    return bound


def output_sample(output: Any) -> torch.Tensor:
    """The sample tensor of a transformer output (`tuple` or `Transformer2DModelOutput`)."""
    return output[0] if isinstance(output, tuple) else output.sample


def replace_sample(output: Any, sample: torch.Tensor) -> Any:
    """The same kind of transformer output with its sample replaced."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output
