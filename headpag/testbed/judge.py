"""
The shapes judge as a metric: a per-image score (the mean log-probability of the prompt's attributes; a HeadHunter
objective, differentiable), per-attribute correctness, and 128-d features for FID/KID/PRDC.

Registered by name where metrics are looked up: objective `"shapes-judge"` (`headpag hunt --objective shapes-judge`),
per-image metric `shapes-judge` and features `--fid-features shapes-judge` (`headpag eval`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .._io import file_sha256
from .data import ATTRIBUTES, IMAGE_SIZE, parse_prompt
from .model import Judge


WEIGHTS = Path(__file__).parent / "weights"
JUDGE_FILE = WEIGHTS / "judge.safetensors"


def load_judge(weights: str | os.PathLike | None = None, device: str | torch.device | None = None) -> Judge:
    r"""
    The trained judge network.

    Args:
        weights (`str`, *optional*): A `judge.safetensors` file (default: the one shipped in the package).
        device (`str`, *optional*): Where to run it (default: CPU).

    Raises:
        `FileNotFoundError`: naming the file and how to make it.
    """
    from safetensors.torch import load_file

    path = Path(weights) if weights is not None else JUDGE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"The shapes judge weights {path} do not exist. Pass the judge.safetensors written by "
            "`python -m headpag.testbed.train --out FOLDER` (or reinstall headpag, which ships them)."
        )
    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval().requires_grad_(False).to(device or "cpu")


def _pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    side = (IMAGE_SIZE, IMAGE_SIZE)
    arrays = [
        np.asarray(im.convert("RGB").resize(side, Image.BILINEAR) if im.size != side else im.convert("RGB"))
        for im in images
    ]
    arrays = [a.astype(np.float32) for a in arrays]
    return torch.from_numpy(np.stack(arrays) / 255.0).permute(0, 3, 1, 2)


def _targets(prompts: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Class indices per attribute, and a (B, len(ATTRIBUTES)) mask of the attributes each prompt names."""
    scenes = [parse_prompt(p) for p in prompts]
    labels = [s.labels() for s in scenes]
    targets = {name: torch.tensor([label[name] for label in labels]) for name in ATTRIBUTES}
    mask = torch.tensor([list(s.named().values()) for s in scenes], dtype=torch.float32)
    return targets, mask


class _JudgeModel:
    """The loaded judge with its device, batch size and provenance (the metric and the features share it)."""

    implementation = ""

    def __init__(self, weights: str | os.PathLike | None = None, device=None, batch_size: int = 256):
        self.device = torch.device(device or "cpu")
        self.judge = load_judge(weights, self.device)
        self.batch_size = batch_size
        path = Path(weights) if weights is not None else JUDGE_FILE
        self.provenance = {
            "implementation": self.implementation,
            "model": "headpag.testbed Judge CNN (96x96 input, bilinear resize)",
            "weights": path.name if weights is None else str(path),
            "weights_sha256": file_sha256(path),
        }


class ShapesJudgeScore(_JudgeModel):
    r"""
    Mean log-probability, under the judge, of the attributes the prompt names (one object: count, size, colour, shape,
    texture, background and, when named, position; two objects: count, both colours and shapes in reading order, their
    layout and the background). 0 is a perfect score; higher is better. Prompts must follow the shapes grammar.

    Args:
        weights (`str`, *optional*): The judge file (default: shipped).
        device (`str`, *optional*): Where to run it.
        batch_size (`int`, defaults to 256): Images per forward pass.
    """

    name = "shapes-judge"
    differentiable = True
    implementation = "headpag shapes judge: mean log-probability of the prompt's attributes"

    def score_tensor(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        r"""
        Differentiable scores of a float batch.

        Args:
            pixels (`torch.Tensor`): `(B, 3, H, W)` RGB in `[0, 1]`, one image per prompt.
            prompts (`list[str]`): Shapes-grammar prompts.

        Returns:
            `torch.Tensor`: `(B,)` mean log-probabilities.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[0] != len(prompts):
            raise ValueError(f"Expected (B, 3, H, W) pixels with one prompt each, got {tuple(pixels.shape)}.")
        targets, mask = _targets(prompts)
        out = self.judge(pixels.to(self.device, torch.float32))
        logp = torch.stack(
            [out[name].gather(1, targets[name].to(self.device)[:, None])[:, 0] for name in ATTRIBUTES], dim=1
        )
        mask = mask.to(self.device)
        return (logp * mask).sum(1) / mask.sum(1)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts.")
        out: list[float] = []
        for i in range(0, len(images), self.batch_size):
            out += self.score_tensor(
                _pixels(images[i : i + self.batch_size]), prompts[i : i + self.batch_size]
            ).tolist()
        return out

    def __call__(self, images, prompts):
        """PIL images: `list[float]`; a float tensor: [`ShapesJudgeScore.score_tensor`] (differentiable)."""
        if isinstance(images, torch.Tensor):
            return self.score_tensor(images, prompts)
        return self.score(images, prompts)

    @torch.no_grad()
    def correct(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, list[bool | None]]:
        """Per attribute, whether the judge's reading matches the prompt (`None` where the prompt does not name it)."""
        targets, mask = _targets(prompts)
        out = {name: [] for name in ATTRIBUTES}
        for i in range(0, len(images), self.batch_size):
            logp = self.judge(_pixels(images[i : i + self.batch_size]).to(self.device))
            for name in ATTRIBUTES:
                hits = (logp[name].argmax(-1).cpu() == targets[name][i : i + self.batch_size]).tolist()
                named = mask[i : i + self.batch_size, list(ATTRIBUTES).index(name)].tolist()
                out[name] += [bool(h) if n else None for h, n in zip(hits, named)]
        return out


def all_correct(correct: dict[str, list[bool | None]]) -> list[bool]:
    """Per image: every attribute the prompt names was read as asked."""
    columns = list(correct.values())
    return [all(c is not False for c in row) for row in zip(*columns)]


class ShapesJudgeAccuracy(ShapesJudgeScore):
    r"""
    1.0 when the judge reads every attribute the prompt names as asked, else 0.0 (its mean is the share of images
    that are right in every attribute). Not differentiable.
    """

    name = "shapes-correct"
    differentiable = False
    implementation = "headpag shapes judge: every named attribute right"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts.")
        return [float(ok) for ok in all_correct(self.correct(images, prompts))]

    def __call__(self, images, prompts):
        return self.score(images, prompts)


class ShapesJudgeFeatures(_JudgeModel):
    r"""
    128-d penultimate features of the shapes judge, for FID/KID/PRDC between sets of shapes images.

    Args:
        weights (`str`, *optional*), device (`str`, *optional*): As for [`ShapesJudgeScore`].
        batch_size (`int`, defaults to 256): Images per forward pass.
    """

    name = "shapes-judge"
    implementation = "headpag shapes judge penultimate features (128-d), bilinear resize to 96x96"

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        chunks = [
            self.judge.features(_pixels(images[i : i + self.batch_size]).to(self.device)).double().cpu().numpy()
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, Judge.feature_dim))
