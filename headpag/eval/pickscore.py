"""PickScore (Kirstain et al., 2023): a CLIP-H preference model, `logit_scale * cos(image, text)` (about 20)."""

from __future__ import annotations

import os

import torch
from PIL import Image

from .base import PairMetric, clip_pixels, default_device
from .provenance import folder_weights_sha256


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

        if model == "yuvalkirstain/PickScore_v1" and os.environ.get("HEADPAG_PICKSCORE_MODEL"):
            model = os.environ["HEADPAG_PICKSCORE_MODEL"]
        if processor is None:
            folder = os.fspath(model)
            names = ("preprocessor_config.json", "processor_config.json")
            has_processor = any(os.path.isfile(os.path.join(folder, name)) for name in names)
            processor = folder if has_processor else "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
        self.device = default_device(device)
        try:
            self.processor = AutoProcessor.from_pretrained(processor)
            self.model = AutoModel.from_pretrained(model).eval().to(self.device)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"PickScore weights could not be loaded from {os.fspath(model)!r} "
                f"(processor {os.fspath(processor)!r}): {type(error).__name__}. Pass a local folder holding "
                "`yuvalkirstain/PickScore_v1` "
                "(`--pickscore-model DIR`, `--objective-model DIR` in `headpag hunt`, or $HEADPAG_PICKSCORE_MODEL) "
                "and, unless that folder holds the processor files, the `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` "
                "processor (`--pickscore-processor DIR`); or run where the Hugging Face Hub is reachable."
            ) from None
        self.provenance = {
            "implementation": "PickScore: logit_scale * cos(image, text) of a CLIP-H preference model",
            "model": os.fspath(model),
            "processor": os.fspath(processor),
            "weights_sha256": folder_weights_sha256(model),
        }
        self.batch_size = batch_size
        self.reset()

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        image_inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        text_inputs = self.processor(
            text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        img = self.model.get_image_features(**image_inputs)
        txt = self.model.get_text_features(**text_inputs)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (self.model.logit_scale.exp() * (img * txt).sum(-1)).float().tolist()

    # ------------------------------------------------------------------ differentiable path
    differentiable = True

    def __call__(self, images, prompts):
        """PIL images: `list[float]` (see [`PairMetric.score`]); a float tensor: [`PickScore.score_tensor`]."""
        if isinstance(images, torch.Tensor):
            return self.score_tensor(images, prompts)
        return self.score(images, prompts)

    def score_tensor(self, pixels: torch.Tensor, prompts) -> torch.Tensor:
        r"""
        Differentiable PickScores of a float image batch (gradients flow to `pixels`).

        The CLIP processor's image transform in torch: bicubic resize of the shortest side (antialiased), center crop,
        normalization; at the processor's resolution it is the PIL path up to uint8 quantization.

        Args:
            pixels (`torch.Tensor`): `(B, 3, H, W)` RGB in `[0, 1]`.
            prompts (`list[str]`): One prompt per image.

        Returns:
            `torch.Tensor`: `(B,)` scores (higher is better).
        """
        image_processor = getattr(self.processor, "image_processor", self.processor)
        size = int(_size_field(image_processor.crop_size, "height"))
        shortest = int(_size_field(image_processor.size, "shortest_edge") or size)
        mean, std = image_processor.image_mean, image_processor.image_std
        x = clip_pixels(pixels, prompts, shortest, size, mean, std, self.device)
        img = self.model.get_image_features(pixel_values=x)
        with torch.no_grad():
            text_inputs = self.processor(
                text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
            ).to(self.device)
            txt = self.model.get_text_features(**text_inputs)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (img * txt).sum(-1).float()


def _size_field(value, key: str):
    """A size setting of an image processor: an int, a dict, or transformers' `SizeDict` (attribute access)."""
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, dict):
        return value.get(key)
    return getattr(value, key, None)
