"""Head sets: immutable sets of `(layer, head)` attention heads, with a spec syntax and a JSON file format.

Layers are numbered as in the HeadHunter paper: SD3 blocks in order; on FLUX the double-stream blocks first, then
single-stream block `i` as layer `num_double_blocks + i` (FLUX.1: 0-18 double, 19-56 single).
"""

from __future__ import annotations

import json
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
    "provenance",
)

# One entry of a spec: "L", "L.*", "L.H", "L.H1-H2", "L1-L2", "L1-L2.H", ...
_RANGE = r"\d+(?:\s*-\s*\d+)?"
_ENTRY_RE = re.compile(rf"^\s*(?P<layers>{_RANGE})\s*(?:\.\s*(?P<heads>\*|{_RANGE}))?\s*$")

# `None` as head means "every head of the layer" until the set is resolved against a model.
Entry = tuple[int, Union[int, None]]
HeadSetLike = Union["HeadSet", str, Iterable[Any], None]


def _parse_range(text: str, what: str, entry: str) -> range:
    parts = [p.strip() for p in text.split("-")]
    lo = int(parts[0])
    hi = int(parts[-1])
    if hi < lo:
        raise ValueError(f"Invalid head spec entry {entry!r}: {what} range {lo}-{hi} is empty (write low-high).")
    return range(lo, hi + 1)


def _compress(values: list[int]) -> list[str]:
    """[0, 1, 2, 5, 7, 8] -> ["0-2", "5", "7-8"]."""
    out: list[str] = []
    start = prev = None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = v
    if start is not None:
        out.append(str(start) if start == prev else f"{start}-{prev}")
    return out


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
    ```

    Spec syntax (comma-separated, whitespace allowed): `"11.15"` one head; `"7"` or `"7.*"` every head of layer 7;
    `"7-9"` layers 7 to 9; `"3.0-5"` heads 0 to 5 of layer 3; `"7-9.2"` head 2 of layers 7 to 9. `str(hs)` is a
    canonical spec that parses back to an equal set.

    Args:
        heads (iterable, *optional*):
            `(layer, head)` pairs (head may be `None`), layer ints, or spec strings.
        metadata (`Mapping`, *optional*):
            Free metadata (model family, recommended scale, provenance, ...). Not part of equality or hashing.
    """

    __slots__ = ("_entries", "_metadata")

    def __init__(self, heads: Iterable[Any] = (), metadata: Mapping[str, Any] | None = None):
        entries: set[Entry] = set()
        for item in heads:
            entries |= set(self._entries_of(item))
        # A whole-layer wildcard absorbs explicit heads of the same layer.
        whole = {layer for layer, head in entries if head is None}
        self._entries: frozenset[Entry] = frozenset(e for e in entries if e[1] is None or e[0] not in whole)
        self._metadata = MappingProxyType(dict(metadata or {}))

    @staticmethod
    def _entries_of(item: Any) -> Iterable[Entry]:
        if isinstance(item, HeadSet):
            return item._entries
        if isinstance(item, str):
            return HeadSet.parse(item)._entries
        if isinstance(item, bool):
            raise ValueError(f"Invalid head {item!r}: expected a layer int or a (layer, head) pair.")
        if isinstance(item, int):
            item = (item, None)
        if isinstance(item, (tuple, list)) and len(item) == 2:
            layer, head = item
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"Invalid head {tuple(item)!r}: layer must be an int >= 0.")
            if head is not None and (isinstance(head, bool) or not isinstance(head, int) or head < 0):
                raise ValueError(f"Invalid head {tuple(item)!r}: head must be an int >= 0 or None (whole layer).")
            return [(int(layer), None if head is None else int(head))]
        raise ValueError(
            f"Invalid head {item!r}: expected a layer int, a (layer, head) pair, a spec string or a HeadSet."
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(cls, spec: str) -> HeadSet:
        """Parse a spec string such as `"11.15, 7, 3.0-5, 7-9"` (see the class docstring)."""
        if not isinstance(spec, str):
            raise ValueError(f"Head spec must be a string, got {type(spec).__name__}.")
        entries: list[Entry] = []
        for raw in spec.split(","):
            if not raw.strip():
                if spec.strip():
                    raise ValueError(f"Invalid head spec {spec!r}: empty entry between commas.")
                continue
            m = _ENTRY_RE.match(raw)
            if m is None:
                raise ValueError(
                    f"Invalid head spec entry {raw.strip()!r} in {spec!r}: expected 'L', 'L.*', 'L.H', 'L.H1-H2' "
                    "or 'L1-L2' with non-negative integers (e.g. '11.15, 7, 3.0-5')."
                )
            layers = _parse_range(m["layers"], "layer", raw.strip())
            heads = m["heads"]
            head_range = [None] if heads in (None, "*") else list(_parse_range(heads, "head", raw.strip()))
            entries.extend((layer, head) for layer in layers for head in head_range)
        return cls(entries)

    @classmethod
    def coerce(cls, value: HeadSetLike) -> HeadSet:
        """Turn a `HeadSet`, spec string, list of pairs or list of layer ints into a `HeadSet` (`None` -> empty)."""
        if value is None:
            return cls()
        if isinstance(value, HeadSet):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return cls([value])
        if isinstance(value, Iterable):
            return cls(value)
        raise ValueError(f"Cannot build a head set from {value!r}: pass a spec string, pairs or layer ints.")

    # ------------------------------------------------------------------ set protocol
    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries, key=lambda e: (e[0], -1 if e[1] is None else e[1])))

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, int):
            return (item, None) in self._entries
        if isinstance(item, tuple) and len(item) == 2:
            return item in self._entries or (item[0], None) in self._entries
        return False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadSet):
            return NotImplemented
        return self._entries == other._entries

    def __hash__(self) -> int:
        return hash(self._entries)

    def __or__(self, other: HeadSetLike) -> HeadSet:
        return HeadSet([self, HeadSet.coerce(other)], metadata=self._metadata)

    union = __or__

    def __sub__(self, other: HeadSetLike) -> HeadSet:
        other = HeadSet.coerce(other)
        if any(h is None for _, h in self._entries | other._entries):
            raise ValueError("Set difference needs explicit heads: call .resolve(num_layers, num_heads) first.")
        return HeadSet(self._entries - other._entries, metadata=self._metadata)

    def __str__(self) -> str:
        by_layer: dict[int, list[int] | None] = {}
        for layer, head in self:
            if head is None:
                by_layer[layer] = None
            else:
                by_layer.setdefault(layer, []).append(head)
        parts: list[str] = []
        whole_run: list[int] = []
        for layer in sorted(by_layer):
            heads = by_layer[layer]
            if heads is None:
                whole_run.append(layer)
                continue
            parts.extend(_compress(whole_run))
            whole_run = []
            parts.extend(f"{layer}.{h}" for h in _compress(heads))
        parts.extend(_compress(whole_run))
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
        return all(h is not None for _, h in self._entries)

    def layers(self) -> list[int]:
        """The sorted list of layers that the set touches."""
        return sorted({layer for layer, _ in self._entries})

    def pairs(self) -> list[tuple[int, int]]:
        """Explicit `(layer, head)` pairs, sorted. Raises when the set still has wildcards."""
        if not self.is_resolved:
            raise ValueError(f"{self!r} has whole-layer entries: call .resolve(num_layers, num_heads) first.")
        return list(self)  # type: ignore[arg-type]

    def heads_by_layer(self) -> dict[int, list[int]]:
        """`{layer: [heads]}` for a resolved set."""
        out: dict[int, list[int]] = {}
        for layer, head in self.pairs():
            out.setdefault(layer, []).append(head)
        return out

    def resolve(self, num_layers: int, num_heads: int) -> HeadSet:
        """
        Expand wildcards to explicit pairs and check every head against the model.

        Args:
            num_layers (`int`): Number of layers of the model (SD3-medium 24, FLUX.1 57).
            num_heads (`int`): Attention heads per layer (24 on SD3 and FLUX.1).

        Raises:
            `ValueError`: naming the bad entry and the valid range when a layer or head is out of range.
        """
        out: list[tuple[int, int]] = []
        for layer, head in self:
            if not 0 <= layer < num_layers:
                entry = f"{layer}" if head is None else f"{layer}.{head}"
                raise ValueError(
                    f"Head set entry {entry!r} is out of range: layer {layer} does not exist; "
                    f"valid layers are 0-{num_layers - 1}."
                )
            if head is None:
                out.extend((layer, h) for h in range(num_heads))
            elif not 0 <= head < num_heads:
                raise ValueError(
                    f"Head set entry '{layer}.{head}' is out of range: head {head} does not exist; "
                    f"valid heads are 0-{num_heads - 1}."
                )
            else:
                out.append((layer, head))
        return HeadSet(out, metadata=self._metadata)

    def with_metadata(self, **metadata: Any) -> HeadSet:
        """A copy with `metadata` merged into the existing metadata."""
        return HeadSet(self._entries, metadata={**self._metadata, **metadata})

    # ------------------------------------------------------------------ files
    def to_json_dict(self) -> dict[str, Any]:
        """The JSON document written by [`~HeadSet.save`]."""
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
                `identity_weight`, `provenance` (a JSON-serialisable dict); merged over the set's own metadata.
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
            if key in metadata and not (isinstance(metadata[key], int) and metadata[key] > 0):
                raise bad(f"'{key}' must be a positive int, got {metadata[key]!r}.")
        u = metadata.get("identity_weight")
        if u is not None and not (isinstance(u, (int, float)) and 0.0 <= u <= 1.0):
            raise bad(f"'identity_weight' must be a number in [0, 1], got {u!r}.")
        hs = cls(pairs, metadata=metadata)
        if "num_layers" in metadata and "num_heads" in metadata:
            try:
                hs.resolve(metadata["num_layers"], metadata["num_heads"])
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
