"""
The clickable layer x head grid: drawn as an image (one cell per head, rows = layers), clicks mapped back to
`(layer, head)`, optionally coloured by search scores.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from ..guidance import HeadSet
from ..options import Limits
from .inputs import head_spec


CELL = 18
LEFT = 30  # room for layer labels
TOP = 16  # room for head labels


def render_grid(
    num_layers: int,
    num_heads: int,
    selected: set[tuple[int, int]] = frozenset(),
    scores: dict[tuple[int, int], float] | None = None,
    num_double_blocks: int | None = None,
) -> Image.Image:
    r"""
    Args:
        num_layers, num_heads (`int`): Grid size (from the loaded model).
        selected (`set`): `(layer, head)` pairs drawn as selected (orange fill, or a red frame over a heatmap).
        scores (`dict`, *optional*): `{(layer, head): score}`; cells are coloured with viridis (blank when missing).
        num_double_blocks (`int`, *optional*): FLUX: a line is drawn below the last double-stream layer.
    """
    import matplotlib

    width, height = LEFT + num_heads * CELL + 1, TOP + num_layers * CELL + 1
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    colormap = matplotlib.colormaps["viridis"]
    lo = hi = None
    if scores:
        lo, hi = min(scores.values()), max(scores.values())
    for head in range(0, num_heads, 2 if num_heads > 12 else 1):
        draw.text((LEFT + head * CELL + 3, 2), str(head), fill="#555")
    for layer in range(num_layers):
        draw.text((2, TOP + layer * CELL + 3), f"{layer:>2}", fill="#555")
        for head in range(num_heads):
            x0, y0 = LEFT + head * CELL, TOP + layer * CELL
            box = (x0, y0, x0 + CELL - 1, y0 + CELL - 1)
            chosen = (layer, head) in selected
            if scores is not None and (layer, head) in scores:
                t = 0.5 if hi == lo else (scores[(layer, head)] - lo) / (hi - lo)
                r, g, b, _ = colormap(t)
                draw.rectangle(box, fill=(int(255 * r), int(255 * g), int(255 * b)), outline="#ddd")
                if chosen:
                    draw.rectangle(box, outline="red", width=3)
            else:
                draw.rectangle(box, fill="#ff8c1a" if chosen else "#eef0f3", outline="#c8ccd2")
    if num_double_blocks and num_double_blocks < num_layers:
        y = TOP + num_double_blocks * CELL
        draw.line((0, y, width, y), fill="#1f4e9c", width=2)
    return image


def cell_at(x: float, y: float, num_layers: int, num_heads: int) -> tuple[int, int] | None:
    """The `(layer, head)` under pixel `(x, y)` of [`render_grid`]'s image, or `None` outside the cells."""
    head, layer = int((x - LEFT) // CELL), int((y - TOP) // CELL)
    if x < LEFT or y < TOP or not (0 <= layer < num_layers and 0 <= head < num_heads):
        return None
    return layer, head


def selected_pairs(spec: str, num_layers: int, num_heads: int, limits: Limits | None = None) -> set[tuple[int, int]]:
    r"""
    The heads of a spec on this model (`ValueError` with the reason when it is malformed, out of range or too long).
    The spec is checked against the grid before any range is expanded (see [`~headpag.app.inputs.head_spec`]).

    Args:
        spec (`str`): The head spec. num_layers, num_heads (`int`): The model's grid.
        limits ([`~headpag.options.Limits`], *optional*): Bounds the spec's length (default: `Limits()`).
    """
    if not (spec or "").strip():
        return set()
    return set(head_spec(spec, num_layers, num_heads, limits or Limits()).pairs())


def toggle(spec: str, layer: int, head: int, num_layers: int, num_heads: int) -> str:
    """`spec` with `(layer, head)` added or removed, in canonical form."""
    pairs = selected_pairs(spec, num_layers, num_heads)
    pairs ^= {(layer, head)}
    return compact_spec(pairs, num_heads)


def compact_spec(pairs: set[tuple[int, int]], num_heads: int) -> str:
    """Canonical spec of `pairs`, with a layer whose heads are all selected written as the bare layer (`"7"`)."""
    full = {l for l in {l for l, _ in pairs} if sum(1 for x, _ in pairs if x == l) == num_heads}
    entries = sorted(full) + sorted(p for p in pairs if p[0] not in full)
    return str(HeadSet(entries)) if entries else ""
