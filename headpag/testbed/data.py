"""
The shapes world: captioned 96×96 images from a small grammar, drawn on the fly.

Two kinds of prompt:

- one object: `"a {size}[ {texture}] {color} {shape} on a {background} background[ at the {position}]"`, texture
  `striped` or `dotted` (no word: plain);
- two objects: `"a {color} {shape} {left of|right of|above|below} a {color} {shape} on a {background} background"`,
  plain, one size, side by side or one above the other around the centre.

Three colour–shape pairs never appear in training, in either kind (`HELD_OUT`), to measure composition. Everything
is seeded: the same `numpy.random.Generator` state gives the same scenes and pixels.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


SIZES = ("small", "large")
COLORS = ("red", "green", "blue", "yellow", "white", "black")
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("plain", "striped", "dotted")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT = (("green", "triangle"), ("yellow", "circle"), ("blue", "square"))
# What the judge reads. Two-object scenes are read in reading order (left then right, top then bottom): `color` and
# `shape` are the first object, `color2` and `shape2` the second, `axis` how they are laid out.
ATTRIBUTES = {
    "count": ("one", "two"),
    "size": SIZES,
    "color": COLORS,
    "shape": SHAPES,
    "texture": TEXTURES,
    "background": COLORS,
    "position": POSITIONS,
    "axis": ("horizontal", "vertical"),
    "color2": COLORS,
    "shape2": SHAPES,
}
ONE_OBJECT = ("count", "size", "color", "shape", "texture", "background", "position")
TWO_OBJECTS = ("count", "color", "shape", "background", "axis", "color2", "shape2")

RGB = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 215),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# the second colour of a striped or dotted object: its colour half-way to black (black: 55% of the way to white)
SHADE = {
    name: tuple(int(c + 0.55 * (255 - c)) for c in rgb) if name == "black" else tuple(int(c * 0.5) for c in rgb)
    for name, rgb in RGB.items()
}
IMAGE_SIZE = 96
HALF = {"small": 13.5, "large": 24.0, "pair": 15.0}  # half the shape's extent, pixels at 96×96
CENTER = {
    "top left": (28.0, 28.0),
    "top right": (68.0, 28.0),
    "bottom left": (28.0, 68.0),
    "bottom right": (68.0, 68.0),
    "center": (48.0, 48.0),
}
PAIR_CENTERS = {"horizontal": ((28.0, 48.0), (68.0, 48.0)), "vertical": ((48.0, 28.0), (48.0, 68.0))}
STRIPE = 8  # texture period in pixels at 96×96 (stripes: half on, half off; dots: one per cell)
_WORD = r"(\w+)"
_ONE = re.compile(
    rf"^a (small|large)(?: (striped|dotted))? {_WORD} {_WORD} on a {_WORD} background"
    rf"(?: at the ({'|'.join(POSITIONS)}))?$"
)
_TWO = re.compile(rf"^a {_WORD} {_WORD} ({'|'.join(RELATIONS)}) a {_WORD} {_WORD} on a {_WORD} background$")


@dataclass(frozen=True)
class Scene:
    r"""
    One image's content.

    Args:
        size (`str`): `small` or `large` (one object); `pair` for two objects.
        color (`str`), shape (`str`): The (first named) object.
        background (`str`): The background colour.
        position (`str`): Where a single object is (`center` for two objects).
        positioned (`bool`): Whether the prompt names the position.
        texture (`str`): `plain`, `striped` or `dotted` (two objects: plain).
        relation (`str`, *optional*): For two objects, where the first named object is relative to the second.
        color2 (`str`, *optional*), shape2 (`str`, *optional*): The second named object.
    """

    size: str
    color: str
    shape: str
    background: str
    position: str = "center"
    positioned: bool = True
    texture: str = "plain"
    relation: str | None = None
    color2: str | None = None
    shape2: str | None = None

    @property
    def two(self) -> bool:
        return self.relation is not None

    @property
    def prompt(self) -> str:
        if self.two:
            return (
                f"a {self.color} {self.shape} {self.relation} a {self.color2} {self.shape2} "
                f"on a {self.background} background"
            )
        texture = "" if self.texture == "plain" else f" {self.texture}"
        text = f"a {self.size}{texture} {self.color} {self.shape} on a {self.background} background"
        return f"{text} at the {self.position}" if self.positioned else text

    @property
    def objects(self) -> list[tuple[str, str]]:
        """`(colour, shape)` of every object, in the order the prompt names them."""
        return [(self.color, self.shape)] + ([(self.color2, self.shape2)] if self.two else [])

    @property
    def held_out(self) -> bool:
        return any(pair in HELD_OUT for pair in self.objects)

    def layout(self) -> list[tuple[str, str, tuple[float, float], float]]:
        """`(colour, shape, centre, half)` of every object as drawn without jitter, in the order the prompt names."""
        if not self.two:
            return [(self.color, self.shape, CENTER[self.position], HALF[self.size])]
        axis = "horizontal" if self.relation in ("left of", "right of") else "vertical"
        first, second = PAIR_CENTERS[axis]
        if self.relation in ("right of", "below"):
            first, second = second, first
        return [(self.color, self.shape, first, HALF["pair"]), (self.color2, self.shape2, second, HALF["pair"])]

    def reading(self) -> dict[str, str]:
        """What the judge should read, one value per attribute in `ATTRIBUTES` (unnamed ones as their first value)."""
        values = {name: options[0] for name, options in ATTRIBUTES.items()}
        values.update(background=self.background, color=self.color, shape=self.shape)
        if not self.two:
            values.update(count="one", size=self.size, texture=self.texture, position=self.position)
            return values
        horizontal = self.relation in ("left of", "right of")
        objects = self.objects
        if self.relation in ("right of", "below"):
            objects = objects[::-1]
        values.update(
            count="two",
            axis="horizontal" if horizontal else "vertical",
            color=objects[0][0],
            shape=objects[0][1],
            color2=objects[1][0],
            shape2=objects[1][1],
        )
        return values

    def labels(self) -> dict[str, int]:
        """Class indices per attribute (the judge's targets)."""
        reading = self.reading()
        return {name: values.index(reading[name]) for name, values in ATTRIBUTES.items()}

    def named(self) -> dict[str, bool]:
        """Per attribute, whether the prompt names it (the judge is scored on these only)."""
        names = TWO_OBJECTS if self.two else ONE_OBJECT
        return {name: name in names and (name != "position" or self.positioned) for name in ATTRIBUTES}


def _grammar() -> str:
    return (
        f"'a {{{'|'.join(SIZES)}}}[ {{striped|dotted}}] {{colour}} {{shape}} on a {{colour}} background"
        f"[ at the {{{'|'.join(POSITIONS)}}}]' or 'a {{colour}} {{shape}} {{{'|'.join(RELATIONS)}}} a {{colour}} "
        f"{{shape}} on a {{colour}} background', with different colours from {', '.join(COLORS)} and shapes from "
        f"{', '.join(SHAPES)}"
    )


def parse_prompt(prompt: str) -> Scene:
    """The scene a grammar prompt asks for; `ValueError` naming the grammar for anything else."""
    text = prompt.strip().lower()
    scene = None
    if match := _ONE.match(text):
        size, texture, color, shape, background, position = match.groups()
        if color in COLORS and background in COLORS and shape in SHAPES and color != background:
            scene = Scene(
                size, color, shape, background, position or "center", position is not None, texture or "plain"
            )
    elif match := _TWO.match(text):
        color, shape, relation, color2, shape2, background = match.groups()
        colors = (color, color2, background)
        if all(c in COLORS for c in colors) and len(set(colors)) == 3 and shape in SHAPES and shape2 in SHAPES:
            scene = Scene("pair", color, shape, background, "center", False, "plain", relation, color2, shape2)
    if scene is None:
        raise ValueError(f"{prompt!r} is not a shapes prompt; expected {_grammar()}.")
    return scene


def all_scenes(held_out: bool | None = False) -> list[Scene]:
    """Every scene of the grammar (one object with position named, and two objects); `held_out` as in `sample_scene`,
    `None` for all."""
    scenes = []
    for size, texture, color, shape, background, position in itertools.product(
        SIZES, TEXTURES, COLORS, SHAPES, COLORS, POSITIONS
    ):
        if color != background:
            scenes.append(Scene(size, color, shape, background, position, True, texture))
    for color, shape, relation, color2, shape2, background in itertools.product(
        COLORS, SHAPES, RELATIONS, COLORS, SHAPES, COLORS
    ):
        if len({color, color2, background}) == 3:
            scenes.append(Scene("pair", color, shape, background, "center", False, "plain", relation, color2, shape2))
    return [s for s in scenes if held_out is None or s.held_out == held_out]


def all_prompts() -> list[str]:
    """Every distinct prompt the grammar makes (with and without positions, held-out pairs included)."""
    prompts = set()
    for scene in all_scenes(None):
        prompts.add(scene.prompt)
        if not scene.two:
            prompts.add(Scene(scene.size, scene.color, scene.shape, scene.background, scene.position, False,
                              scene.texture).prompt)  # fmt: skip
    return sorted(prompts)


def sample_scene(
    rng: np.random.Generator, held_out: bool = False, positioned: float = 0.5, two: float | None = 0.4
) -> Scene:
    r"""
    A random scene.

    Args:
        rng (`np.random.Generator`): The only source of randomness.
        held_out (`bool`): `False`: no object is a held-out pair (training scenes); `True`: at least one is.
        positioned (`float`): Probability that a one-object prompt names its position.
        two (`float`, *optional*): Probability of a two-object scene (`0`: one object only).
    """
    while True:
        if rng.random() < (two or 0.0):
            color, color2, background = rng.choice(len(COLORS), 3, replace=False)
            shape, shape2 = rng.integers(len(SHAPES), size=2)
            scene = Scene(
                "pair", COLORS[color], SHAPES[shape], COLORS[background], "center", False, "plain",
                RELATIONS[int(rng.integers(len(RELATIONS)))], COLORS[color2], SHAPES[shape2],
            )  # fmt: skip
        else:
            color, background = rng.choice(len(COLORS), 2, replace=False)
            scene = Scene(
                SIZES[int(rng.integers(2))],
                COLORS[color],
                SHAPES[int(rng.integers(len(SHAPES)))],
                COLORS[background],
                POSITIONS[int(rng.integers(len(POSITIONS)))],
                bool(rng.random() < positioned),
                TEXTURES[int(rng.integers(len(TEXTURES)))],
            )
        if scene.held_out == held_out:
            return scene


def outline(canvas: ImageDraw.ImageDraw, shape: str, x: float, y: float, h: float, fill) -> None:
    """Draw `shape` with half-extent `h` at `(x, y)` (canvas pixels): the one geometry of the testbed."""
    if shape == "circle":
        canvas.ellipse([x - h, y - h, x + h, y + h], fill=fill)
    elif shape == "square":
        h = h * 0.9
        canvas.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    elif shape == "triangle":
        canvas.polygon([(x, y - h), (x + h * 1.1, y + h * 0.85), (x - h * 1.1, y + h * 0.85)], fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; allowed: {', '.join(SHAPES)}.")


def _texture(texture: str, size: int, phase: np.ndarray) -> Image.Image:
    """An `L` mask (canvas pixels) of where a texture's second colour goes."""
    image = Image.new("L", (size, size), 0)
    if texture == "plain":
        return image
    canvas = ImageDraw.Draw(image)
    period = size / IMAGE_SIZE * STRIPE
    if texture == "striped":
        y = phase[1] * period - period
        while y < size:
            canvas.rectangle([0, y, size, y + period / 2], fill=255)
            y += period
    else:
        r = period * 0.22
        for gy in np.arange(phase[1] * period - period, size + period, period):
            for gx in np.arange(phase[0] * period - period, size + period, period):
                canvas.ellipse([gx - r, gy - r, gx + r, gy + r], fill=255)
    return image


def draw(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE, jitter: bool = True) -> Image.Image:
    """Draw `scene` antialiased (4× supersampled); `jitter` moves, scales and tints it slightly."""
    scale = 4
    s = size / IMAGE_SIZE * scale
    canvas_size = size * scale
    tint = rng.integers(-12, 13, 3) if jitter else np.zeros(3, dtype=int)
    bg = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(RGB[scene.background], tint))
    image = Image.new("RGB", (canvas_size, canvas_size), bg)
    for color, shape, (cx, cy), half in scene.layout():
        shift = rng.uniform(-3, 3, 2) if jitter else np.zeros(2)
        half = half * (rng.uniform(0.92, 1.08) if jitter else 1.0)
        tint = rng.integers(-12, 13, 3) if jitter else np.zeros(3, dtype=int)
        fg = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(RGB[color], tint))
        mask = Image.new("L", (canvas_size, canvas_size), 0)
        outline(ImageDraw.Draw(mask), shape, (cx + shift[0]) * s, (cy + shift[1]) * s, half * s, 255)
        image.paste(fg, mask=mask)
        if scene.texture != "plain":
            pattern = _texture(scene.texture, canvas_size, rng.uniform(0, 1, 2) if jitter else np.zeros(2))
            shade = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(SHADE[color], tint))
            image.paste(shade, mask=Image.fromarray(np.minimum(np.asarray(mask), np.asarray(pattern))))
    return image.resize((size, size), Image.BOX)


def batch(rng: np.random.Generator, n: int, held_out: bool = False, positioned: float = 0.5, two: float = 0.4):
    """`n` random scenes and their images as a float array (n, 3, 96, 96) in [0, 1]."""
    scenes = [sample_scene(rng, held_out, positioned, two) for _ in range(n)]
    pixels = np.stack([np.asarray(draw(scene, rng), dtype=np.float32) for scene in scenes]) / 255.0
    return scenes, pixels.transpose(0, 3, 1, 2)


def main(argv: list[str] | None = None) -> int:
    """`python -m headpag.testbed.data`: write procedural images (FID references) or a prompt file."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m headpag.testbed.data", description=main.__doc__)
    parser.add_argument("--images", default=None, help="Folder to write COUNT reference PNGs into.")
    parser.add_argument("--prompts", default=None, help="File to write COUNT distinct prompts into, one per line.")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", action="store_true", help="Only scenes with a held-out colour-shape pair.")
    parser.add_argument("--two", type=float, default=0.4, help="Share of two-object scenes, in [0, 1] (default 0.4).")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 100_000:
        parser.error(f"--count must be in [1, 100000], got {args.count}")
    if not 0.0 <= args.two <= 1.0:
        parser.error(f"--two must be in [0, 1], got {args.two}")
    if args.prompts is None and args.images is None:
        parser.error("give --images FOLDER and/or --prompts FILE")
    rng = np.random.default_rng(args.seed)
    if args.prompts:
        distinct = [p for p in all_prompts() if parse_prompt(p).held_out == args.held_out]
        if args.count > len(distinct):
            parser.error(f"--count {args.count}: the grammar has {len(distinct)} such prompts")
        prompts: list[str] = []
        while len(prompts) < args.count:
            prompt = sample_scene(rng, args.held_out, two=args.two).prompt
            if prompt not in prompts:
                prompts.append(prompt)
        Path(args.prompts).write_text("\n".join(prompts) + "\n")
    if args.images:
        folder = Path(args.images)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.count):
            draw(sample_scene(rng, args.held_out, two=args.two), rng).save(folder / f"{i:05d}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
