"""PickScore (Kirstain et al., 2023): a CLIP-H preference model, `logit_scale * cos(image, text)` (about 20)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from .base import PairMetric, check_pairs, default_device


class PickScore(PairMetric):
    r"""
    PickScore of image-prompt pairs.

    Args:
        model (`str`, defaults to `"yuvalkirstain/PickScore_v1"`): Hub id or local folder of the `CLIPModel`.
        processor (`str`, *optional*): Hub id or local folder of the `CLIPProcessor`; defaults to `model` when it
            is a folder holding one, else `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`.
        device (`str`, *optional*): Where to run.
        batch_size (`int`, defaults to 16): Pairs per forward pass.
    """

    def __init__(
        self,
        model: str | os.PathLike = "yuvalkirstain/PickScore_v1",
        processor: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 16,
    ):
        from transformers import AutoModel, AutoProcessor

        if processor is None:
            folder = os.fspath(model)
            names = ("preprocessor_config.json", "processor_config.json")
            has_processor = any(os.path.isfile(os.path.join(folder, name)) for name in names)
            processor = folder if has_processor else "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
        self.device = default_device(device)
        self.processor = AutoProcessor.from_pretrained(processor)
        self.model = AutoModel.from_pretrained(model).eval().to(self.device)
        self.batch_size = batch_size
        self.reset()

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        check_pairs(images, prompts)
        out: list[float] = []
        for i in range(0, len(images), self.batch_size):
            image_inputs = self.processor(
                images=[im.convert("RGB") for im in images[i : i + self.batch_size]], return_tensors="pt"
            ).to(self.device)
            text_inputs = self.processor(
                text=list(prompts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=77,
                return_tensors="pt",
            ).to(self.device)
            img = self.model.get_image_features(**image_inputs)
            txt = self.model.get_text_features(**text_inputs)
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.extend((self.model.logit_scale.exp() * (img * txt).sum(-1)).float().tolist())
        return out
