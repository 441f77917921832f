"""
Strict reading of the raw values that reach the UI's handlers (the API endpoints skip Gradio's own preprocessing, so
every value is checked here): types, finite numbers, ranges, and the server's [`~headpag.options.Limits`], each
refusal naming the value, the limit and the flag that raises it. Head specs are checked against the loaded model's
layer and head counts before anything is expanded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from ..guidance import HeadSet
from ..options import Limits, parse_seeds


# One well-formed spec entry: "L", "L1-L2", "L.*", "L.H", "L.H1-H2", "L1-L2.H1-H2" (HeadSet.parse's syntax).
_SPEC_ENTRY = re.compile(r"^\s*(\d+)(?:\s*-\s*(\d+))?\s*(?:\.\s*(?:\*|(\d+)(?:\s*-\s*(\d+))?))?\s*$")


def text(value: Any, name: str, limits: Limits, max_chars: int | None = None) -> str:
    r"""
    A string field (`None` is `""`), refused when it is not a string or longer than the limit.

    Args:
        value: The raw value. name (`str`): Its API name, for messages. limits ([`Limits`]): The server's limits.
        max_chars (`int`, *optional*): Another bound than `max_prompt_chars` (a multi-line field), still reported
            as `max_prompt_chars`.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got a {type(value).__name__}.")
    bound = limits.max_prompt_chars if max_chars is None else max_chars
    if len(value) > bound:
        raise ValueError(
            f"{name} is {len(value)} characters, over the limit of {bound} set by max_prompt_chars="
            f"{limits.max_prompt_chars}; the server's operator can raise it with {Limits.flag('max_prompt_chars')}."
        )
    return value


def lines(value: Any, name: str, limits: Limits) -> list[str]:
    """The non-empty lines of a multi-line field: at most `max_prompts` lines of at most `max_prompt_chars` each."""
    raw = text(value, name, limits, max_chars=limits.max_prompts * (limits.max_prompt_chars + 1))
    out = [line.strip() for line in raw.splitlines() if line.strip()]
    limits.check_count(f"number of {name}", len(out), "max_prompts")
    for line in out:
        text(line, f"a line of {name}", limits)
    return out


def flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_show(value)}.")
    return value


def number(
    value: Any,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    limits: Limits | None = None,
    limit: str | None = None,
) -> float:
    r"""
    A finite number in range.

    Args:
        value: The raw value. name (`str`): Its API name.
        minimum, maximum (`float`, *optional*): The allowed range (a property of the value, not a server limit).
        limits ([`Limits`], *optional*), limit (`str`, *optional*): A server limit on the absolute value (e.g.
            `"max_scale"`), refused with the limit's name and flag.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {_show(value)}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value:g}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {value:g}.")
    if limit is not None and abs(value) > getattr(limits, limit):
        limits.refuse(name, value, limit)
    return float(value)


def integer(
    value: Any,
    name: str,
    minimum: int | None = None,
    maximum: int | None = None,
    limits: Limits | None = None,
    limit: str | None = None,
) -> int:
    """A finite whole number in range (`3.0` is accepted, `3.5`, `NaN` and `true` are not); see [`number`]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an integer, got {_show(value)}.")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite integer, got {value}.")
        if not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value}.")
        value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}.")
    if limit is not None and value > getattr(limits, limit):
        limits.refuse(name, value, limit)
    return value


def choice(value: Any, name: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {_show(value)}.")
    return value


def size(value: Any, name: str, limits: Limits) -> int:
    """An image side: a multiple of 16, at least 16, at most `max_size`."""
    value = integer(value, name, minimum=16, limits=limits, limit="max_size")
    if value % 16:
        raise ValueError(f"{name} must be a multiple of 16 (at least 16), got {value}.")
    return value


def seeds(value: Any, limits: Limits, name: str = "seeds") -> list[int]:
    """A seed list (`"0-4"`, `"0,3,7"`): at most `max_seeds`, counted from the text before any range is expanded."""
    raw = text(value, name, limits).strip() or "0"
    try:
        return parse_seeds(raw, limit=limits.max_seeds)
    except ValueError as e:
        if "over the limit" in str(e):
            raise ValueError(f"{e} The server's operator can raise it with {Limits.flag('max_seeds')}.") from None
        raise


def head_spec(spec: Any, num_layers: int, num_heads: int, limits: Limits, name: str = "pag_heads") -> HeadSet:
    r"""
    The heads of a spec on the loaded model, checked against its layer and head counts *before* any range is
    expanded (so `"0-99999999"` costs as much as its text), then parsed and resolved.

    Args:
        spec (`str`): The spec (`""` is the empty set). num_layers, num_heads (`int`): The model's grid.
        limits ([`Limits`]): The spec's length is bounded by `max_prompt_chars`.
        name (`str`): Its API name, for messages.

    Raises:
        `ValueError`: naming the entry and the valid range (as [`HeadSet.resolve`] does), or the syntax error.
    """
    spec = text(spec, name, limits)
    if not spec.strip():
        return HeadSet()
    for raw in spec.split(","):
        match = _SPEC_ENTRY.match(raw)
        if match is None:
            continue  # HeadSet.parse names the syntax error below
        entry = raw.strip()
        layer_lo, layer_hi, head_lo, head_hi = (None if g is None else int(g) for g in match.groups())
        for layer in (layer_lo, layer_hi):
            if layer is not None and layer >= num_layers:
                raise ValueError(
                    f"Head set entry {entry!r} is out of range: layer {layer} does not exist; valid layers are "
                    f"0-{num_layers - 1}."
                )
        for head in (head_lo, head_hi):
            if head is not None and head >= num_heads:
                raise ValueError(
                    f"Head set entry {entry!r} is out of range: head {head} does not exist; valid heads are "
                    f"0-{num_heads - 1}."
                )
    return HeadSet.parse(spec).resolve(num_layers, num_heads)


def pool(spec: Any, num_layers: int, num_heads: int, limits: Limits) -> tuple[str | None, int]:
    """A search pool: `(its spec, or None for every head; its size)`, the size at most `max_pool`."""
    heads = head_spec(spec, num_layers, num_heads, limits, name="pool")
    count = len(heads) if heads else num_layers * num_heads
    limits.check_count("pool size", count, "max_pool")
    return (spec.strip() if heads else None), count


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."
