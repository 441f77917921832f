"""
Generating the images of a comparison: every prompt-seed pair under each named configuration, cached on disk and
reused when an image's stored settings and model match.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .._io import save_png
from ..pipelines.settings import GenerationSettings
from .scoring import ImageSet


@dataclass
class EvalConfig:
    r"""
    One named configuration of a comparison.

    Args:
        name (`str`): Column name and image folder name.
        options (`str`): The generation flags as given, e.g. `"--pag-heads 7 --guidance-scale 1"`.
        settings ([`GenerationSettings`]): The parsed settings (prompt and seed are filled in per image).

    Clients build one from `NAME=OPTIONS` text with `headpag.cli.evaluate.parse_eval_config`.
    """

    name: str
    options: str
    settings: GenerationSettings
    flags: Any = None  # the parsed options (`argparse.Namespace`), to check head-set files against the model


class Comparison:
    r"""
    Generate (or reuse) the images of every configuration for the prompt x seed grid.

    Args:
        prompts (`list[str]`), seeds (`list[int]`): Every prompt is generated with every seed.
        configs (`list[EvalConfig]`): The configurations; names must be unique.
        output_dir (`str`): Images go to `output_dir/images/<name>/<prompt index>_seed<seed>.png`.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        configs: Sequence[EvalConfig],
        output_dir: str | os.PathLike,
    ):
        if not prompts or not seeds or not configs:
            raise ValueError("A comparison needs at least one prompt, one seed and one --config.")
        names = [c.name for c in configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Configuration names must be unique; repeated: {', '.join(duplicates)}.")
        self.prompts, self.seeds, self.configs = list(prompts), list(seeds), list(configs)
        self.output_dir = Path(output_dir)

    def items(self) -> list[tuple[int, str, int]]:
        """`(prompt index, prompt, seed)`, prompt-major."""
        return [(i, p, s) for i, p in enumerate(self.prompts) for s in self.seeds]

    def path(self, config: EvalConfig, index: int, seed: int) -> Path:
        return self.output_dir / "images" / config.name / f"{index:03d}_seed{seed}.png"

    def generate(self, pipe, model_name: str, progress: Callable | None = None) -> tuple[int, int]:
        r"""
        Generate the missing images; an image on disk is reused when its stored settings and model match.

        Args:
            pipe: A head-PAG pipeline.
            model_name (`str`): Stored with each image; a different model regenerates.
            progress (`Callable[[str], None]`, *optional*): Called after each image with the configuration name.

        Returns:
            `(generated, reused)` counts.
        """
        from ..guidance import HeadSet
        from ..runtime import describe_transformer

        layout = describe_transformer(pipe.transformer)
        family = layout.family
        for config in self.configs:  # every configuration is checked before any image is generated
            config.settings.validate(family)
            if config.settings.pag_heads is not None:
                HeadSet.parse(config.settings.pag_heads).resolve(layout.num_layers, layout.num_heads)
        generated = reused = 0
        for config in self.configs:
            for index, prompt, seed in self.items():
                settings = GenerationSettings(**{**config.settings.to_dict(), "prompt": prompt, "seed": seed})
                settings.with_model_defaults(pipe)
                meta = {"headpag": settings.to_json(), "model": model_name, "prompt": prompt, "config": config.name}
                path = self.path(config, index, seed)
                if _stored_metadata_matches(path, meta):
                    reused += 1
                else:
                    image = pipe(**settings.call_kwargs(family)).images[0]
                    save_png(image, path, meta)
                    generated += 1
                if progress:
                    progress(config.name)
        return generated, reused

    def image_sets(self) -> list[ImageSet]:
        items = self.items()
        return [
            ImageSet(
                c.name,
                [self.path(c, i, s) for i, _, s in items],
                [p for _, p, _ in items],
                [s for _, _, s in items],
                c.options,
            )
            for c in self.configs
        ]


def _stored_metadata_matches(path: Path, meta: dict[str, str]) -> bool:
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            stored = dict(im.text)
    except OSError:
        return False
    return all(stored.get(k) == v for k, v in meta.items())
