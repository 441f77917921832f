"""
A structure metric that is not a classifier: fit the shape the prompt names (circle, square or triangle; position
and size free, class fixed) to the pixels of the object's colour, and report how well it fits (IoU) and how much of
the image is marked outside the fitted shapes (stray marks).

Objects are told apart by colour: every pixel goes to the nearest colour of the testbed's palette (the six colours
and the second colours of striped and dotted objects, each counted as its object's colour), and an object's mask is
the pixels of its named colour, so a texture does not cut holes in it. The fit starts from the mask's centroid and
area and refines centre and size by a coarse-to-fine search over shapes drawn exactly as [`~testbed.data.draw`]
draws them (same geometry, 4x supersampled, a pixel counted when at least half covered).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .data import RGB, SHADE, outline, parse_prompt


PALETTE = tuple(RGB)
_AREA_PER_H2 = {"circle": np.pi, "square": 1.8**2, "triangle": 0.5 * 2.2 * 1.85}  # shape area / half-extent^2
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeFit:
    r"""
    How one object of an image fits the shape its prompt names.

    Args:
        color (`str`), shape (`str`): The object the prompt names.
        iou (`float`): Intersection over union of the object's pixels and the best-fitting shape (0 when absent).
        center (`tuple[float, float]`), half (`float`): The fitted shape (pixels; `half` as in `data.draw`).
        pixels (`int`): The object's pixels.
    """

    color: str
    shape: str
    iou: float
    center: tuple[float, float]
    half: float
    pixels: int


@dataclass(frozen=True)
class Structure:
    r"""
    Args:
        objects (`list[ShapeFit]`): One fit per object the prompt names.
        stray (`float`): Share of the image that is neither background nor inside a fitted shape (grown by one
            pixel, so antialiased edges do not count).
    """

    objects: list[ShapeFit]
    stray: float

    @property
    def iou(self) -> float:
        """The mean IoU of the objects."""
        return float(np.mean([o.iou for o in self.objects])) if self.objects else 0.0


def colour_labels(image: Image.Image | np.ndarray, shades: tuple[str, ...] = ()) -> np.ndarray:
    r"""
    The palette index of every pixel (nearest colour in RGB), `(H, W)`.

    Args:
        image (`PIL.Image.Image` or `np.ndarray`): An RGB image.
        shades (`tuple[str]`): Colours whose texture shade (`data.SHADE`) counts as the colour itself.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    names = list(PALETTE) + list(shades)
    palette = np.array([RGB[name] for name in PALETTE] + [SHADE[name] for name in shades], dtype=np.float32)
    nearest = np.argmin(((pixels[:, :, None, :] - palette) ** 2).sum(-1), axis=-1)
    return np.array([PALETTE.index(name) for name in names])[nearest]


def shape_mask(shape: str, center: tuple[float, float], half: float, size: tuple[int, int]) -> np.ndarray:
    """A boolean `(H, W)` mask of `shape` drawn as `data.draw` draws it, a pixel set when at least half covered."""
    width, height = size
    s = _SUPERSAMPLE
    canvas_image = Image.new("L", (width * s, height * s), 0)
    canvas = ImageDraw.Draw(canvas_image)
    outline(canvas, shape, center[0] * s, center[1] * s, half * s, 255)
    return np.asarray(canvas_image.resize((width, height), Image.BOX)) >= 128


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def fit_shape(mask: np.ndarray, shape: str) -> tuple[float, tuple[float, float], float]:
    """`(iou, center, half)` of the `shape` that best fits a boolean mask (coarse-to-fine search)."""
    if not mask.any():
        return 0.0, (0.0, 0.0), 0.0
    size = (mask.shape[1], mask.shape[0])
    ys, xs = np.nonzero(mask)
    half = float(np.sqrt(mask.sum() / _AREA_PER_H2[shape]))
    center = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    if shape == "triangle":  # a drawn triangle's centroid lies 0.233 half-extents below the point `data.draw` takes
        center = (center[0], center[1] - (0.85 * 2 - 1) / 3 * half)
    best = (_iou(mask, shape_mask(shape, center, half, size)), center, half)
    for step in (2.0, 1.0, 0.5, 0.25):
        improved = True
        while improved:
            improved = False
            _, (cx, cy), h = best
            for dx, dy, dh in (
                (step, 0, 0), (-step, 0, 0), (0, step, 0), (0, -step, 0), (0, 0, step / 2), (0, 0, -step / 2),
            ):  # fmt: skip
                candidate = ((cx + dx, cy + dy), max(0.5, h + dh))
                score = _iou(mask, shape_mask(shape, candidate[0], candidate[1], size))
                if score > best[0] + 1e-9:
                    best, improved = (score, candidate[0], candidate[1]), True
    return best


def structure(image: Image.Image | np.ndarray, prompt: str) -> Structure:
    r"""
    The structure of a testbed image against its prompt: per named object, the IoU of the best-fitting shape of the
    named class, and the stray-mark area.

    Args:
        image (`PIL.Image.Image` or `np.ndarray`): An RGB image.
        prompt (`str`): A shapes prompt (see [`~testbed.data.parse_prompt`]).
    """
    scene = parse_prompt(prompt)
    labels = colour_labels(image, shades=() if scene.texture == "plain" else (scene.color,))
    height, width = labels.shape
    background = labels == PALETTE.index(scene.background)
    fits, covered = [], np.zeros_like(background)
    for color, shape in scene.objects:
        mask = labels == PALETTE.index(color)
        iou, center, half = fit_shape(mask, shape)
        fits.append(ShapeFit(color, shape, iou, center, half, int(mask.sum())))
        if half > 0:
            covered |= shape_mask(shape, center, half + 1.0, (width, height))
    stray = float(np.logical_and(~background, ~covered).sum() / background.size)
    return Structure(fits, stray)


class ShapesStructureScore:
    r"""
    The structure metric as a per-image score (`headpag eval --metrics shapes-structure`, a HeadHunter objective): the
    mean IoU of the prompt's objects with their best-fitting shapes, minus the stray-mark area. Not a classifier and
    not differentiable; no weights.

    Args:
        device: Unused (the registry passes one to every metric).
    """

    name = "shapes-structure"
    differentiable = False

    def __init__(self, device=None):
        self.provenance = {
            "implementation": "headpag shapes structure: IoU of the named shape fitted to the object's colour mask, "
            "minus the stray-mark area",
            "model": None,
            "weights": None,
        }
        self._scores: list[float] = []

    def score(self, images, prompts) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts.")
        out = []
        for image, prompt in zip(images, prompts):
            result = structure(image, prompt)
            out.append(result.iou - result.stray)
        return out

    def __call__(self, images, prompts) -> list[float]:
        return self.score(images, prompts)

    def update(self, images, prompts) -> None:
        self._scores.extend(self.score(images, prompts))

    def compute(self) -> float:
        if not self._scores:
            raise ValueError("ShapesStructureScore.compute() called before any update().")
        return float(np.mean(self._scores))

    def reset(self) -> None:
        self._scores = []
