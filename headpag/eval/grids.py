"""Image grids for reports: rows of equally sized tiles, with optional column labels."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw


DEFAULT_CELL = 256


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    column_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    cell: int | None = DEFAULT_CELL,
) -> Image.Image:
    r"""
    Paste images into a grid of equal tiles, with labels.

    Args:
        rows (`list[list[PIL.Image.Image]]`): One list per row.
        column_labels (`list[str]`, *optional*): A caption above each column (e.g. the configuration).
        row_labels (`list[str]`, *optional*): A caption left of each row (e.g. the prompt and seed).
        cell (`int`, *optional*, defaults to 256): The longest side of a tile in pixels (images are downscaled,
            keeping their aspect ratio, never upscaled); `None` keeps the first image's full size.
    """
    w, h = rows[0][0].size
    if cell is not None and max(w, h) > cell:
        w, h = (cell, max(1, round(h * cell / w))) if w >= h else (max(1, round(w * cell / h)), cell)
    top = 16 if column_labels else 0
    left = 0
    if row_labels:
        left = min(320, 8 + 6 * max(len(label) for label in row_labels))
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (left + w * columns, top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    if column_labels:
        for j, label in enumerate(column_labels):
            draw.text((left + j * w + 2, 2), label[: max(4, w // 6)], fill="black")
    for i, row in enumerate(rows):
        if row_labels:
            draw.text((2, top + i * h + 2), _wrap(row_labels[i], max(4, (left - 4) // 6), h // 12), fill="black")
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), (left + j * w, top + i * h))
    return grid


def _wrap(text: str, width: int, lines: int) -> str:
    """`text` in lines of at most `width` characters, at most `lines` lines."""
    out = [text[i : i + width] for i in range(0, len(text), width)][: max(1, lines)]
    return "\n".join(out)
