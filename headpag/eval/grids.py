"""Image grids for reports: rows of equally sized tiles, with optional column labels."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw


def image_grid(rows: Sequence[Sequence[Image.Image]], column_labels: Sequence[str] | None = None) -> Image.Image:
    r"""
    Paste images into a grid (each resized to the first image's size).

    Args:
        rows (`list[list[PIL.Image.Image]]`): One list per row.
        column_labels (`list[str]`, *optional*): A caption above each column.
    """
    w, h = rows[0][0].size
    top = 16 if column_labels else 0
    grid = Image.new("RGB", (w * max(len(r) for r in rows), top + h * len(rows)), "white")
    if column_labels:
        draw = ImageDraw.Draw(grid)
        for j, label in enumerate(column_labels):
            draw.text((j * w + 2, 2), label[: max(4, w // 6)], fill="black")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((w, h)), (j * w, top + i * h))
    return grid
