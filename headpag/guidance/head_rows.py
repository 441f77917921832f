"""
The symbolic form of head sets: rows of consecutive layers that share the same heads, their normal form (merged,
sorted, disjoint), and the spec-string parser. Work is proportional to the text, never to the ranges it names.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from typing import Any, Union


# `None` as head means "every head of the layer" until the set is resolved against a model.
Entry = tuple[int, Union[int, None]]
# Inclusive `(low, high)` runs; a row is `(first_layer, last_layer, heads)` with `heads` a tuple of disjoint,
# non-adjacent, sorted head runs, or `None` for every head of those layers.
Interval = tuple[int, int]
Heads = Union[tuple[Interval, ...], None]
Row = tuple[int, int, Heads]


# Bounds on what a spec string may ask for, so that one short request cannot make the parser do much work.
MAX_SPEC_CHARS = 20_000
"""Longest accepted spec string (every head of FLUX.1 written out one by one takes about 10,000 characters)."""
MAX_SPEC_ENTRIES = 2_048
"""Most comma-separated entries in one spec string (FLUX.1 has 1,368 heads)."""
MAX_INDEX_DIGITS = 9
"""Layer and head numbers in a spec have at most this many digits."""
MAX_EXPANDED = 1 << 20
"""Most heads that [`HeadSet.pairs`], [`HeadSet.layers`] or a JSON file list one by one."""
_SPEC_WORK_BUDGET = 1 << 18  # union work allowed for overlapping multi-layer ranges in one spec

# One entry of a spec (already stripped): "L", "L.*", "L.H", "L.H1-H2", "L1-L2", "L1-L2.H", ...
_RANGE = r"\d+(?:\s*-\s*\d+)?"
_ENTRY_RE = re.compile(rf"(?P<layers>{_RANGE})\s*(?:\.\s*(?P<heads>\*|{_RANGE}))?")


class _TooComplex(Exception):
    pass


def fmt_range(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def merge(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    """Sorted, disjoint, non-adjacent runs covering the same integers as `intervals`."""
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _cut(rows: list[Row], layers: tuple[Interval, ...]) -> list[Row]:
    """`rows` (sorted, disjoint) without the layer runs `layers` (sorted, disjoint), in one pass."""
    out: list[Row] = []
    j = 0
    for lo, hi, heads in rows:
        while j < len(layers) and layers[j][1] < lo:
            j += 1
        k, cur = j, lo
        while k < len(layers) and layers[k][0] <= hi:
            if layers[k][0] > cur:
                out.append((cur, layers[k][0] - 1, heads))
            cur = max(cur, layers[k][1] + 1)
            k += 1
        if cur <= hi:
            out.append((cur, hi, heads))
    return out


def subtract(a: tuple[Interval, ...], b: tuple[Interval, ...]) -> tuple[Interval, ...]:
    """The integers of runs `a` that are not in runs `b` (both sorted and disjoint)."""
    return tuple((lo, hi) for lo, hi, _ in _cut([(lo, hi, None) for lo, hi in a], b))


def normalize(rects: Iterable[Row], budget: int | None = None) -> tuple[Row, ...]:
    """
    The canonical rows of a union of rectangles `(first_layer, last_layer, heads)`: sorted, disjoint layer runs,
    whole-layer rows absorbing explicit heads, and neighbouring rows with equal heads merged.

    `budget` bounds the work spent on overlapping multi-layer rows (raises `_TooComplex`).
    """
    rects = list(rects)
    whole = merge((lo, hi) for lo, hi, heads in rects if heads is None)
    # Rows with the same heads first merge their layer runs, so repeating one head over nested ranges stays cheap.
    groups: dict[tuple[Interval, ...], list[Interval]] = {}
    for lo, hi, heads in rects:
        if heads is not None:
            groups.setdefault(heads, []).append((lo, hi))
    explicit = sorted(
        ((lo, hi, heads) for heads, runs in groups.items() for lo, hi in merge(runs)), key=lambda r: r[0]
    )
    rows: list[Row] = []
    if explicit:
        points = sorted({r[0] for r in explicit} | {r[1] + 1 for r in explicit})
        active: list[Row] = []
        i = work = 0
        for start, stop in zip(points, points[1:]):
            while i < len(explicit) and explicit[i][0] == start:
                active.append(explicit[i])
                i += 1
            active = [r for r in active if r[1] >= start]
            if not active:
                continue
            work += len(active) + sum(len(r[2]) for r in active)
            if budget is not None and work > budget:
                raise _TooComplex
            heads = active[0][2] if len(active) == 1 else merge(iv for r in active for iv in r[2])
            rows.append((start, stop - 1, heads))
        # A whole-layer wildcard absorbs explicit heads of the same layer.
        rows = _cut(rows, whole)
    rows.extend((lo, hi, None) for lo, hi in whole)
    rows.sort(key=lambda r: r[0])
    out: list[Row] = []
    for row in rows:
        if out and out[-1][1] + 1 == row[0] and out[-1][2] == row[2]:
            out[-1] = (out[-1][0], row[1], row[2])
        else:
            out.append(row)
    return tuple(out)


def check_index(value: Any, what: str, item: Any, allow_none: bool = False) -> int | None:
    """`value` as a layer/head number: an int (or an integer-like object such as a NumPy int) >= 0."""
    if value is None and allow_none:
        return None
    problem = None
    if isinstance(value, bool):
        problem = f"got the bool {value!r}"
    elif isinstance(value, float):
        problem = f"got the float {value!r}"
    else:
        try:
            number = operator.index(value)
        except TypeError:
            problem = f"got {type(value).__name__} {value!r}"
        else:
            if number >= 0:
                return number
            problem = f"got {number}"
    extra = " or None (whole layer)" if allow_none else ""
    shown = tuple(item) if isinstance(item, list) else item
    raise ValueError(f"Invalid head {shown!r}: {what} must be an int >= 0{extra}, {problem}.")


def _parse_range(text: str, what: str, entry: str) -> Interval:
    parts = [p.strip() for p in text.split("-")]
    for part in parts:
        if len(part) > MAX_INDEX_DIGITS:
            raise ValueError(
                f"Invalid head spec entry {entry[:40]!r}: {what} number {part[:12]}... has more than "
                f"{MAX_INDEX_DIGITS} digits."
            )
    lo = int(parts[0])
    hi = int(parts[-1])
    if hi < lo:
        raise ValueError(f"Invalid head spec entry {entry!r}: {what} range {lo}-{hi} is empty (write low-high).")
    return lo, hi


def check_dim(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


def parse_spec(spec: str) -> tuple[Row, ...]:
    """The normalized rows of a spec string (see [`~headpag.guidance.heads.HeadSet.parse`]); work proportional to its
    length."""
    if not isinstance(spec, str):
        raise ValueError(f"Head spec must be a string, got {type(spec).__name__}.")
    if len(spec) > MAX_SPEC_CHARS:
        raise ValueError(
            f"Invalid head spec {spec[:40]!r}...: {len(spec)} characters, at most {MAX_SPEC_CHARS} are allowed."
        )
    if spec.count(",") >= MAX_SPEC_ENTRIES:
        raise ValueError(
            f"Invalid head spec {spec[:40]!r}...: {spec.count(',') + 1} entries, at most {MAX_SPEC_ENTRIES} "
            "are allowed (use ranges such as '3.0-5' or '7-9')."
        )
    rects: list[Row] = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            if spec.strip():
                raise ValueError(f"Invalid head spec {spec[:80]!r}: empty entry between commas.")
            continue
        m = _ENTRY_RE.fullmatch(entry)
        if m is None:
            raise ValueError(
                f"Invalid head spec entry {entry[:40]!r} in {spec[:80]!r}: expected 'L', 'L.*', 'L.H', "
                "'L.H1-H2' or 'L1-L2' with non-negative integers (e.g. '11.15, 7, 3.0-5')."
            )
        lo, hi = _parse_range(m["layers"], "layer", entry)
        heads = m["heads"]
        rects.append((lo, hi, None if heads in (None, "*") else (_parse_range(heads, "head", entry),)))
    try:
        return normalize(rects, budget=_SPEC_WORK_BUDGET)
    except _TooComplex:
        raise ValueError(
            f"Invalid head spec {spec[:40]!r}...: too many overlapping multi-layer ranges; write the heads "
            "with fewer overlapping entries."
        ) from None
