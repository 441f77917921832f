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
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

from .._io import atomic_write_json
from .head_rows import (
    MAX_EXPANDED,
    Entry,
    Row,
    check_dim,
    check_index,
    fmt_range,
    merge,
    normalize,
    parse_spec,
    subtract,
)


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

HeadSetLike = Union["HeadSet", str, Iterable[Any], None]


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
        layer = check_index(value, "layer", value)
        return [(layer, layer, None)]
    rects: list[Row] = []
    by_layer: dict[int, set[int] | None] = {}
    for item in value:
        if isinstance(item, (HeadSet, str)):
            rects.extend(_rects_of(item))
            continue
        if isinstance(item, (tuple, list)) and len(item) == 2:
            layer = check_index(item[0], "layer", item)
            head = check_index(item[1], "head", item, allow_none=True)
        elif isinstance(item, Iterable):
            raise ValueError(
                f"Invalid head {item!r}: expected a layer int, a (layer, head) pair, a spec string or a HeadSet."
            )
        else:
            layer, head = check_index(item, "layer", item), None
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
            rects.append((layer, layer, merge((h, h) for h in heads)))
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
        self._rows: tuple[Row, ...] = normalize(_rects_of(heads))
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
        return cls._from_rows(parse_spec(spec))

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
            heads = mine[2] if theirs is None else subtract(mine[2], theirs[2])
            if heads:
                rects.append((start, stop - 1, heads))
        return HeadSet._from_rows(normalize(rects), metadata=self._metadata)

    def __str__(self) -> str:
        parts: list[str] = []
        for lo, hi, heads in self._rows:
            layers = fmt_range(lo, hi)
            if heads is None:
                parts.append(layers)
            else:
                parts.extend(f"{layers}.{fmt_range(a, b)}" for a, b in heads)
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
        check_dim(num_layers, "num_layers")
        check_dim(num_heads, "num_heads")
        for lo, hi, heads in self._rows:
            layers = fmt_range(lo, hi)
            if hi >= num_layers:
                entry = layers if heads is None else f"{layers}.{fmt_range(*heads[0])}"
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
                    f"Head set entry '{layers}.{fmt_range(a, b)}' is out of range: {missing}; "
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
        rows = normalize((lo, hi, every if heads is None else heads) for lo, hi, heads in self._rows)
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
