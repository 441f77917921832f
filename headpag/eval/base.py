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


def clip_pixels(
    pixels: torch.Tensor, prompts: Sequence[str], shortest: int, crop: int, mean, std, device: torch.device
) -> torch.Tensor:
    r"""
    The CLIP image transform in torch, differentiable: bicubic (antialiased) resize of the shortest side to
    `shortest`, center crop to `crop`, normalization by `mean`/`std`. At the model's resolution it equals the PIL
    transform up to uint8 quantization.

    Args:
        pixels (`torch.Tensor`): `(B, 3, H, W)` RGB in `[0, 1]`, one image per prompt.
        prompts (`Sequence[str]`): Only checked for count.
        shortest, crop (`int`): Target shortest side and crop size.
        mean, std: Per-channel normalization.
        device (`torch.device`): Where the model runs.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[0] != len(prompts):
        raise ValueError(f"Expected (B, 3, H, W) pixels with one prompt each, got {tuple(pixels.shape)}.")
    x = pixels.to(device, torch.float32)
    h, w = x.shape[-2:]
    if min(h, w) != shortest:
        scale = shortest / min(h, w)
        new = (max(shortest, round(h * scale)), max(shortest, round(w * scale)))
        x = torch.nn.functional.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
    h, w = x.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.as_tensor(std, dtype=torch.float32, device=device)[:, None, None]
    return (x[..., top : top + crop, left : left + crop] - mean) / std
