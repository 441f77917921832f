"""The shared metric protocol: per-pair `score`, and `update` / `compute` / `reset` for a running mean."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image


def default_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_pairs(images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts.")


class PairMetric:
    """
    A metric of image-prompt pairs. Subclasses set `batch_size` and implement `_score_batch` (RGB images, prompts ->
    scores); calling the metric is `score` (a HeadHunter objective).
    """

    batch_size: int = 32

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """One score per pair, computed `batch_size` pairs at a time."""
        check_pairs(images, prompts)
        out: list[float] = []
        for i in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            out.extend(self._score_batch(batch, list(prompts[i : i + self.batch_size])))
        return out

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return self.score(images, prompts)

    def update(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
        self._scores.extend(self.score(images, prompts))

    def compute(self) -> float:
        """Mean score of everything passed to `update` since the last `reset`."""
        if not self._scores:
            raise ValueError(f"{type(self).__name__}.compute() called before any update().")
        return float(sum(self._scores) / len(self._scores))

    def reset(self) -> None:
        self._scores: list[float] = []
