"""Head sets: immutable sets of `(layer, head)` attention heads, with a spec syntax and a JSON file format.

Layers are numbered as in the HeadHunter paper: SD3 blocks in order; on FLUX the double-stream blocks first, then
single-stream block `i` as layer `num_double_blocks + i` (FLUX.1: 0-18 double, 19-56 single).

A head set is stored symbolically, as rows of consecutive layers that share the same heads (`"0-9.2"` is one row,
however many layers it spans), so parsing a spec and checking it against a model cost time proportional to the
spec's text, never to the ranges it names. Heads are only listed one by one by [`~HeadSet.pairs`], iteration and
the JSON file, after [`~HeadSet.check`] / [`~HeadSet.resolve`] have bounded them by the model.
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

from .._io import atomic_write_json


FILE_FORMAT = "headpag.headset"
FILE_VERSION = 1
METADATA_KEYS = (
    "model_family",
    "model_name",
    "num_layers",
    "num_heads",
    "recommended_scale",
    "identity_weight",
    "description",
    "provenance",
)

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

# `None` as head means "every head of the layer" until the set is resolved against a model.
Entry = tuple[int, Union[int, None]]
HeadSetLike = Union["HeadSet", str, Iterable[Any], None]
# Inclusive `(low, high)` runs; a row is `(first_layer, last_layer, heads)` with `heads` a tuple of disjoint,
# non-adjacent, sorted head runs, or `None` for every head of those layers.
Interval = tuple[int, int]
Heads = Union[tuple[Interval, ...], None]
Row = tuple[int, int, Heads]


class _TooComplex(Exception):
    pass


def _fmt(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _merge(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
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


def _subtract(a: tuple[Interval, ...], b: tuple[Interval, ...]) -> tuple[Interval, ...]:
    """The integers of runs `a` that are not in runs `b` (both sorted and disjoint)."""
    return tuple((lo, hi) for lo, hi, _ in _cut([(lo, hi, None) for lo, hi in a], b))


def _normalize(rects: Iterable[Row], budget: int | None = None) -> tuple[Row, ...]:
    """
    The canonical rows of a union of rectangles `(first_layer, last_layer, heads)`: sorted, disjoint layer runs,
    whole-layer rows absorbing explicit heads, and neighbouring rows with equal heads merged.

    `budget` bounds the work spent on overlapping multi-layer rows (raises `_TooComplex`).
    """
    rects = list(rects)
    whole = _merge((lo, hi) for lo, hi, heads in rects if heads is None)
    # Rows with the same heads first merge their layer runs, so repeating one head over nested ranges stays cheap.
    groups: dict[tuple[Interval, ...], list[Interval]] = {}
    for lo, hi, heads in rects:
        if heads is not None:
            groups.setdefault(heads, []).append((lo, hi))
    explicit = sorted(
        ((lo, hi, heads) for heads, runs in groups.items() for lo, hi in _merge(runs)), key=lambda r: r[0]
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
            heads = active[0][2] if len(active) == 1 else _merge(iv for r in active for iv in r[2])
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


def _index(value: Any, what: str, item: Any, allow_none: bool = False) -> int | None:
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


def _check_dim(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


def _rects_of(value: Any) -> list[Row]:
    """The rows of anything a [`HeadSet`] is built from (see its constructor)."""
    if value is None:
        return []
    if isinstance(value, HeadSet):
        return list(value._rows)
    if isinstance(value, str):
        return list(HeadSet.parse(value)._rows)
    if isinstance(value, (bool, float, bytes, bytearray)) or not (
        isinstance(value, Iterable) or hasattr(value, "__index__")
    ):
        raise ValueError(f"Cannot build a head set from {value!r}: pass a spec string, pairs or layer ints.")
    if not isinstance(value, Iterable):
        layer = _index(value, "layer", value)
        return [(layer, layer, None)]
    rects: list[Row] = []
    by_layer: dict[int, set[int] | None] = {}
    for item in value:
        if isinstance(item, (HeadSet, str)):
            rects.extend(_rects_of(item))
            continue
        if isinstance(item, (tuple, list)) and len(item) == 2:
            layer = _index(item[0], "layer", item)
            head = _index(item[1], "head", item, allow_none=True)
        elif isinstance(item, Iterable):
            raise ValueError(
                f"Invalid head {item!r}: expected a layer int, a (layer, head) pair, a spec string or a HeadSet."
            )
        else:
            layer, head = _index(item, "layer", item), None
        if head is None:
            by_layer[layer] = None
        else:
            heads = by_layer.setdefault(layer, set())
            if heads is not None:
                heads.add(head)
    for layer, heads in by_layer.items():
        if heads is None:
            rects.append((layer, layer, None))
        else:
            rects.append((layer, layer, _merge((h, h) for h in heads)))
    return rects


class HeadSet:
    r"""
    An immutable set of attention heads `(layer, head)`, 0-indexed, where `head=None` stands for every head of the
    layer (a wildcard, expanded by [`~HeadSet.resolve`]).

    Build one from a spec string, a list of `(layer, head)` pairs, or a list of layer ints:

    ```py
    >>> HeadSet.parse("11.15, 7, 3.0-2")
    HeadSet('3.0-2, 7, 11.15')
    >>> HeadSet([(11, 15), (1, 10)]) | HeadSet([7])
    HeadSet('1.10, 7, 11.15')
    >>> HeadSet("11") == HeadSet.coerce("11") == HeadSet([11])  # a string is always a spec
    True
    ```

    Spec syntax (comma-separated, whitespace allowed): `"11.15"` one head; `"7"` or `"7.*"` every head of layer 7;
    `"7-9"` layers 7 to 9; `"3.0-5"` heads 0 to 5 of layer 3; `"7-9.2"` head 2 of layers 7 to 9. `str(hs)` is a
    canonical spec that parses back to an equal set. A spec has at most `MAX_SPEC_CHARS` characters and
    `MAX_SPEC_ENTRIES` entries; ranges stay symbolic, so `"0-99999999"` costs no more than `"0-9"` until it is
    checked against a model ([`~HeadSet.check`], [`~HeadSet.resolve`]), which refuses it.

    Args:
        heads (`HeadSet`, `str`, `int` or iterable, *optional*):
            A spec string (parsed as by [`~HeadSet.parse`]), a layer int, or an iterable of `(layer, head)` pairs
            (head may be `None`), layer ints, spec strings and head sets. Numbers must be ints >= 0 (NumPy ints
            are fine; bools and floats are refused).
        metadata (`Mapping`, *optional*):
            Free metadata (model family, recommended scale, provenance, ...). Not part of equality or hashing.
    """

    __slots__ = ("_rows", "_metadata")

    def __init__(self, heads: HeadSetLike | int = (), metadata: Mapping[str, Any] | None = None):
        self._rows: tuple[Row, ...] = _normalize(_rects_of(heads))
        self._metadata = MappingProxyType(dict(metadata or {}))

    @classmethod
    def _from_rows(cls, rows: tuple[Row, ...], metadata: Mapping[str, Any] | None = None) -> HeadSet:
        hs = cls.__new__(cls)
        hs._rows = rows
        hs._metadata = MappingProxyType(dict(metadata or {}))
        return hs

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(cls, spec: str) -> HeadSet:
        """
        Parse a spec string such as `"11.15, 7, 3.0-5, 7-9"` (see the class docstring).

        The work done is proportional to the length of `spec`, whatever ranges it names.

        Args:
            spec (`str`): The spec; at most `MAX_SPEC_CHARS` characters and `MAX_SPEC_ENTRIES` entries.

        Raises:
            `ValueError`: naming the bad entry, or the limit a too long spec exceeds.
        """
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
            return cls._from_rows(_normalize(rects, budget=_SPEC_WORK_BUDGET))
        except _TooComplex:
            raise ValueError(
                f"Invalid head spec {spec[:40]!r}...: too many overlapping multi-layer ranges; write the heads "
                "with fewer overlapping entries."
            ) from None

    @classmethod
    def coerce(cls, value: HeadSetLike | int) -> HeadSet:
        """
        Turn a `HeadSet`, spec string, layer int, or list of pairs / layer ints into a `HeadSet` (`None` -> empty).

        Same meaning as the constructor (a string is a spec: `"11"` is layer 11), but returns a `HeadSet` as is.
        """
        if isinstance(value, HeadSet):
            return value
        return cls(value)

    # ------------------------------------------------------------------ set protocol
    def __iter__(self) -> Iterator[Entry]:
        for lo, hi, heads in self._rows:
            for layer in range(lo, hi + 1):
                if heads is None:
                    yield (layer, None)
                else:
                    for a, b in heads:
                        for head in range(a, b + 1):
                            yield (layer, head)

    def __len__(self) -> int:
        return sum(
            (hi - lo + 1) * (1 if heads is None else sum(b - a + 1 for a, b in heads)) for lo, hi, heads in self._rows
        )

    def __bool__(self) -> bool:
        return bool(self._rows)

    def _row_at(self, layer: int) -> Row | None:
        i = bisect.bisect_right(self._rows, layer, key=lambda r: r[0]) - 1
        if i >= 0 and self._rows[i][1] >= layer:
            return self._rows[i]
        return None

    def __contains__(self, item: object) -> bool:
        if isinstance(item, int) and not isinstance(item, bool):
            row = self._row_at(item)
            return row is not None and row[2] is None
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int):
            row = self._row_at(item[0])
            if row is None:
                return False
            if row[2] is None:
                return True
            head = item[1]
            return isinstance(head, int) and any(a <= head <= b for a, b in row[2])
        return False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadSet):
            return NotImplemented
        return self._rows == other._rows

    def __hash__(self) -> int:
        return hash(self._rows)

    def __or__(self, other: HeadSetLike) -> HeadSet:
        return HeadSet([self, HeadSet.coerce(other)], metadata=self._metadata)

    union = __or__

    def __sub__(self, other: HeadSetLike) -> HeadSet:
        other = HeadSet.coerce(other)
        if not (self.is_resolved and other.is_resolved):
            raise ValueError("Set difference needs explicit heads: call .resolve(num_layers, num_heads) first.")
        points = sorted(
            {r[0] for r in self._rows} | {r[1] + 1 for r in self._rows + other._rows} | {r[0] for r in other._rows}
        )
        rects: list[Row] = []
        for start, stop in zip(points, points[1:]):
            mine = self._row_at(start)
            if mine is None:
                continue
            theirs = other._row_at(start)
            heads = mine[2] if theirs is None else _subtract(mine[2], theirs[2])
            if heads:
                rects.append((start, stop - 1, heads))
        return HeadSet._from_rows(_normalize(rects), metadata=self._metadata)

    def __str__(self) -> str:
        parts: list[str] = []
        for lo, hi, heads in self._rows:
            layers = _fmt(lo, hi)
            if heads is None:
                parts.append(layers)
            else:
                parts.extend(f"{layers}.{_fmt(a, b)}" for a, b in heads)
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"HeadSet({str(self)!r})"

    # ------------------------------------------------------------------ queries
    @property
    def metadata(self) -> Mapping[str, Any]:
        """Read-only metadata (from a file or given at construction); not part of equality."""
        return self._metadata

    @property
    def is_resolved(self) -> bool:
        """`True` when the set holds explicit heads only (no whole-layer wildcard)."""
        return all(heads is not None for _, _, heads in self._rows)

    def _short(self) -> str:
        text = str(self)
        return repr(self) if len(text) <= 60 else f"HeadSet({text[:60]!r}...)"

    def _guard_expansion(self, count: int, what: str) -> None:
        if count > MAX_EXPANDED:
            raise ValueError(
                f"{self._short()} has {count} {what}, more than {MAX_EXPANDED} to list one by one: check it "
                "against the model first with .resolve(num_layers, num_heads)."
            )

    def layers(self) -> list[int]:
        """The sorted list of layers that the set touches."""
        self._guard_expansion(sum(hi - lo + 1 for lo, hi, _ in self._rows), "layers")
        return [layer for lo, hi, _ in self._rows for layer in range(lo, hi + 1)]

    def pairs(self) -> list[tuple[int, int]]:
        """Explicit `(layer, head)` pairs, sorted. Raises when the set still has wildcards."""
        if not self.is_resolved:
            raise ValueError(f"{self._short()} has whole-layer entries: call .resolve(num_layers, num_heads) first.")
        self._guard_expansion(len(self), "heads")
        return list(self)  # type: ignore[arg-type]

    def heads_by_layer(self) -> dict[int, list[int]]:
        """`{layer: [heads]}` for a resolved set."""
        out: dict[int, list[int]] = {}
        for layer, head in self.pairs():
            out.setdefault(layer, []).append(head)
        return out

    def check(self, num_layers: int, num_heads: int) -> HeadSet:
        """
        Check every layer and head against a model, without expanding anything (time proportional to the number
        of entries of `str(self)`, never to the ranges).

        Args:
            num_layers (`int`): Number of layers of the model (SD3-medium 24, FLUX.1 57).
            num_heads (`int`): Attention heads per layer (24 on SD3 and FLUX.1).

        Returns:
            `HeadSet`: `self`, unchanged, for chaining.

        Raises:
            `ValueError`: naming the bad entry and the valid range when a layer or head is out of range, e.g.
                `"Head set entry '0-99999999' is out of range: layers 24-99999999 do not exist; valid layers are
                0-23."`
        """
        _check_dim(num_layers, "num_layers")
        _check_dim(num_heads, "num_heads")
        for lo, hi, heads in self._rows:
            layers = _fmt(lo, hi)
            if hi >= num_layers:
                entry = layers if heads is None else f"{layers}.{_fmt(*heads[0])}"
                first = max(lo, num_layers)
                missing = f"layer {hi} does not exist" if first == hi else f"layers {first}-{hi} do not exist"
                raise ValueError(
                    f"Head set entry {entry!r} is out of range: {missing}; valid layers are 0-{num_layers - 1}."
                )
            if heads is not None and heads[-1][1] >= num_heads:
                a, b = next((a, b) for a, b in heads if b >= num_heads)
                first = max(a, num_heads)
                missing = f"head {b} does not exist" if first == b else f"heads {first}-{b} do not exist"
                raise ValueError(
                    f"Head set entry '{layers}.{_fmt(a, b)}' is out of range: {missing}; "
                    f"valid heads are 0-{num_heads - 1}."
                )
        return self

    def resolve(self, num_layers: int, num_heads: int) -> HeadSet:
        """
        Check every head against the model (see [`~HeadSet.check`]), then expand wildcards to explicit heads.

        Args:
            num_layers (`int`): Number of layers of the model (SD3-medium 24, FLUX.1 57).
            num_heads (`int`): Attention heads per layer (24 on SD3 and FLUX.1).

        Raises:
            `ValueError`: naming the bad entry and the valid range when a layer or head is out of range.
        """
        self.check(num_layers, num_heads)
        every = ((0, num_heads - 1),)
        rows = _normalize((lo, hi, every if heads is None else heads) for lo, hi, heads in self._rows)
        return HeadSet._from_rows(rows, metadata=self._metadata)

    def with_metadata(self, **metadata: Any) -> HeadSet:
        """A copy with `metadata` merged into the existing metadata."""
        return HeadSet._from_rows(self._rows, metadata={**self._metadata, **metadata})

    # ------------------------------------------------------------------ files
    def to_json_dict(self) -> dict[str, Any]:
        """The JSON document written by [`~HeadSet.save`] (lists the heads one by one: at most `MAX_EXPANDED`)."""
        self._guard_expansion(len(self), "heads")
        doc: dict[str, Any] = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "spec": str(self),
            "heads": [[layer, head] for layer, head in self],
        }
        for key in METADATA_KEYS:
            if self._metadata.get(key) is not None:
                doc[key] = self._metadata[key]
        return doc

    def save(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """
        Save as JSON (atomically: a temp file, then a rename).

        Args:
            path (`str` or `os.PathLike`): Destination `.json` file.
            **metadata: Any of `model_family`, `model_name`, `num_layers`, `num_heads`, `recommended_scale`,
                `identity_weight`, `description` (a string), `provenance` (a JSON-serialisable dict); merged over
                the set's own metadata.
        """
        unknown = set(metadata) - set(METADATA_KEYS)
        if unknown:
            raise ValueError(f"Unknown head-set metadata {sorted(unknown)}; allowed: {list(METADATA_KEYS)}.")
        hs = self.with_metadata(**metadata) if metadata else self
        return atomic_write_json(path, hs.to_json_dict())

    @classmethod
    def from_json_dict(cls, doc: Any, source: str = "<dict>") -> HeadSet:
        """Validate and read a document written by [`~HeadSet.to_json_dict`]; `source` names it in errors."""

        def bad(problem: str) -> ValueError:
            return ValueError(f"Malformed head-set file {source}: {problem}")

        if not isinstance(doc, dict):
            raise bad(f"expected a JSON object, got {type(doc).__name__}.")
        if doc.get("format", FILE_FORMAT) != FILE_FORMAT:
            raise bad(f"'format' is {doc.get('format')!r}, expected {FILE_FORMAT!r}.")
        if "heads" not in doc:
            raise bad("missing the 'heads' list.")
        heads = doc["heads"]
        if not isinstance(heads, list):
            raise bad(f"'heads' must be a list of [layer, head] pairs, got {type(heads).__name__}.")
        pairs = []
        for i, item in enumerate(heads):
            ok = (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], int)
                and not isinstance(item[0], bool)
                and item[0] >= 0
                and (item[1] is None or (isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0))
            )
            if not ok:
                raise bad(
                    f"heads[{i}] = {item!r} is not a [layer, head] pair of non-negative ints (head may be null)."
                )
            pairs.append((item[0], item[1]))
        metadata = {k: doc[k] for k in METADATA_KEYS if k in doc}
        for key in ("num_layers", "num_heads"):
            value = metadata.get(key)
            if key in metadata and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise bad(f"'{key}' must be a positive int, got {metadata[key]!r}.")
        u = metadata.get("identity_weight")
        if u is not None and not (isinstance(u, (int, float)) and 0.0 <= u <= 1.0):
            raise bad(f"'identity_weight' must be a number in [0, 1], got {u!r}.")
        if "description" in metadata and not isinstance(metadata["description"], str):
            raise bad(f"'description' must be a string, got {type(metadata['description']).__name__}.")
        hs = cls(pairs, metadata=metadata)
        if "num_layers" in metadata and "num_heads" in metadata:
            try:
                hs.check(metadata["num_layers"], metadata["num_heads"])
            except ValueError as e:
                raise bad(str(e)) from None
        return hs

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadSet:
        """Load a head-set JSON file; raises `ValueError` naming the file and the problem when it is malformed."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"Head-set file {path} does not exist.") from None
        except UnicodeDecodeError:
            raise ValueError(f"Malformed head-set file {path}: not UTF-8 text.") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Malformed head-set file {path}: not valid JSON ({e}).") from None
        return cls.from_json_dict(doc, source=str(path))
