"""
The shapes world: captioned 64×64 images from a small grammar, drawn on the fly.

`"a {size} {color} {shape} on a {background} background"`, optionally followed by `" at the {position}"`. Three
colour–shape pairs never appear in training (`HELD_OUT`), to measure composition. Everything is seeded: the same
`numpy.random.Generator` state gives the same scenes and pixels.
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
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
HELD_OUT = (("green", "triangle"), ("yellow", "circle"), ("blue", "square"))
ATTRIBUTES = {"size": SIZES, "color": COLORS, "shape": SHAPES, "background": COLORS, "position": POSITIONS}

RGB = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 215),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
IMAGE_SIZE = 64
_HALF = {"small": 9.0, "large": 16.0}  # half the shape's extent, pixels at 64×64
_CENTER = {"top left": (19, 19), "top right": (45, 19), "bottom left": (19, 45), "bottom right": (45, 45)}
_PROMPT = re.compile(
    r"^a (small|large) (\w+) (circle|square|triangle) on a (\w+) background(?: at the (top left|top right|"
    r"bottom left|bottom right|center))?$"
)


@dataclass(frozen=True)
class Scene:
    """One image's attributes. `positioned` says whether the prompt names the position."""

    size: str
    color: str
    shape: str
    background: str
    position: str
    positioned: bool = True

    @property
    def prompt(self) -> str:
        text = f"a {self.size} {self.color} {self.shape} on a {self.background} background"
        return f"{text} at the {self.position}" if self.positioned else text

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT

    def labels(self) -> dict[str, int]:
        """Class indices per attribute (the judge's targets)."""
        return {name: values.index(getattr(self, name)) for name, values in ATTRIBUTES.items()}


def parse_prompt(prompt: str) -> Scene:
    """The scene a grammar prompt asks for; `ValueError` naming the grammar for anything else."""
    match = _PROMPT.match(prompt.strip().lower())
    if not match or match.group(2) not in COLORS or match.group(4) not in COLORS or match.group(2) == match.group(4):
        raise ValueError(
            f"{prompt!r} is not a shapes prompt; expected 'a {{small|large}} {{colour}} {{circle|square|triangle}} "
            f"on a {{colour}} background[ at the {{{'|'.join(POSITIONS)}}}]' with two different colours from "
            f"{', '.join(COLORS)}."
        )
    size, color, shape, background, position = match.groups()
    return Scene(size, color, shape, background, position or "center", positioned=position is not None)


def all_scenes(held_out: bool | None = False) -> list[Scene]:
    """Every prompt of the grammar (positions named), `held_out=True` only the held-out pairs, `None` all."""
    scenes = []
    for size, color, shape, background, position in itertools.product(SIZES, COLORS, SHAPES, COLORS, POSITIONS):
        scene = Scene(size, color, shape, background, position)
        if color != background and (held_out is None or scene.held_out == held_out):
            scenes.append(scene)
    return scenes


def all_prompts() -> list[str]:
    """Every distinct prompt the grammar makes (with and without positions, held-out pairs included)."""
    prompts = {s.prompt for s in all_scenes(None)}
    prompts |= {Scene(s.size, s.color, s.shape, s.background, s.position, False).prompt for s in all_scenes(None)}
    return sorted(prompts)


def sample_scene(rng: np.random.Generator, held_out: bool = False, positioned: float = 0.5) -> Scene:
    """A random scene: training pairs (`held_out=False`) or only held-out pairs (`True`)."""
    while True:
        color, background = rng.choice(len(COLORS), 2, replace=False)
        shape = int(rng.integers(len(SHAPES)))
        scene = Scene(
            SIZES[int(rng.integers(2))],
            COLORS[color],
            SHAPES[shape],
            COLORS[background],
            POSITIONS[int(rng.integers(len(POSITIONS)))],
            bool(rng.random() < positioned),
        )
        if scene.held_out == held_out:
            return scene


def draw(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE, jitter: bool = True) -> Image.Image:
    """Draw `scene` antialiased (4× supersampled); `jitter` moves, scales and tints it slightly."""
    scale = 4
    s = size / IMAGE_SIZE * scale
    cx, cy = _CENTER.get(scene.position, (32, 32))
    half = _HALF[scene.size]
    shift = rng.uniform(-2, 2, 2) if jitter else np.zeros(2)
    half = half * (rng.uniform(0.92, 1.08) if jitter else 1.0)
    tint = rng.integers(-12, 13, 6) if jitter else np.zeros(6, dtype=int)
    fg = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(RGB[scene.color], tint[:3]))
    bg = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(RGB[scene.background], tint[3:]))
    image = Image.new("RGB", (size * scale, size * scale), bg)
    canvas = ImageDraw.Draw(image)
    x, y, h = (cx + shift[0]) * s, (cy + shift[1]) * s, half * s
    if scene.shape == "circle":
        canvas.ellipse([x - h, y - h, x + h, y + h], fill=fg)
    elif scene.shape == "square":
        h = h * 0.9
        canvas.rectangle([x - h, y - h, x + h, y + h], fill=fg)
    else:
        canvas.polygon([(x, y - h), (x + h * 1.1, y + h * 0.85), (x - h * 1.1, y + h * 0.85)], fill=fg)
    return image.resize((size, size), Image.BOX)


def batch(rng: np.random.Generator, n: int, held_out: bool = False, positioned: float = 0.5):
    """`n` random scenes and their images as a float array (n, 3, 64, 64) in [0, 1]."""
    scenes = [sample_scene(rng, held_out, positioned) for _ in range(n)]
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
    parser.add_argument("--held-out", action="store_true", help="Only the held-out colour-shape pairs.")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 100_000:
        parser.error(f"--count must be in [1, 100000], got {args.count}")
    if args.prompts is None and args.images is None:
        parser.error("give --images FOLDER and/or --prompts FILE")
    rng = np.random.default_rng(args.seed)
    if args.prompts:
        distinct = [p for p in all_prompts() if parse_prompt(p).held_out == args.held_out]
        if args.count > len(distinct):
            parser.error(f"--count {args.count}: the grammar has {len(distinct)} such prompts")
        prompts: list[str] = []
        while len(prompts) < args.count:
            prompt = sample_scene(rng, args.held_out).prompt
            if prompt not in prompts:
                prompts.append(prompt)
        Path(args.prompts).write_text("\n".join(prompts) + "\n")
    if args.images:
        folder = Path(args.images)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.count):
            draw(sample_scene(rng, args.held_out), rng).save(folder / f"{i:05d}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
