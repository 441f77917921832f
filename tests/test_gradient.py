"""The differentiable path of CLIP score: the same scores as the PIL path on images at the model's resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_tiny_clip_checkpoint
from PIL import Image

from headpag.eval import ClipScore


def test_clip_score_tensor_path_matches_the_pil_path_and_is_differentiable(tmp_path):
    config, checkpoint = write_tiny_clip_checkpoint(tmp_path, "tiny-clip-s3", seed=3)  # seed 3: every score > 0
    clip = ClipScore(str(config), checkpoint=checkpoint, device="cpu")
    assert clip.differentiable
    size, _, _ = clip._transform_parts()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a cat", "a red car", "a dog on grass"]
    pixels = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1) for im in images])
    pixels.requires_grad_(True)
    scores = clip(pixels, prompts)
    assert scores.shape == (3,)
    assert scores.tolist() == pytest.approx(clip(images, prompts), abs=1e-3)
    assert scores.requires_grad
    # The clamp at 0 (the metric's definition) stops the gradient of an image scored 0; the others get one.
    assert (scores > 1).all()
    scores.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    for i, score in enumerate(scores.tolist()):
        assert (pixels.grad[i].abs().sum() > 0) == (score > 0)
    # Other sizes are resized in torch (no PIL round trip): still one score per image, still differentiable.
    assert clip(torch.rand(2, 3, size * 2, size + 8), prompts[:2]).shape == (2,)
    with pytest.raises(ValueError, match="one prompt each"):
        clip(pixels.detach(), prompts[:2])
