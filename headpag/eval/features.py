"""
Image features for distribution metrics (FID, KID): the standard FID Inception-v3 (pool3, 2048-d), or an open_clip
image encoder.

The Inception network is pytorch-fid's port of the TensorFlow FID graph (`pt_inception-2015-12-05-6726825d.pth`),
with its input handling (bilinear resize to 299 x 299, values scaled to [-1, 1]); with those weights the numbers are
comparable with published FIDs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging
from PIL import Image

from .base import default_device
from .clip_score import clip_weights, load_open_clip, load_state_dict
from .provenance import file_sha256


logger = logging.get_logger(__name__)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
INCEPTION_ENV = "HEADPAG_INCEPTION_WEIGHTS"


class MissingWeightsError(FileNotFoundError):
    """A metric's weight file is neither given, nor cached, nor downloadable."""


def inception_weights_path(weights: str | os.PathLike | None = None, download: bool = True) -> Path:
    r"""
    Find the FID Inception weights: `weights`, else `$HEADPAG_INCEPTION_WEIGHTS`, else torch's hub cache, else a
    download into that cache.

    Args:
        weights (`str`, *optional*): A local file (`.pth` read with `weights_only=True`, or `.safetensors`).
        download (`bool`, defaults to `True`): Try to download when nothing local is found.

    Raises:
        `MissingWeightsError`: naming the file that is needed and where to put it.
    """
    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    help_text = (
        f"FID/KID need the FID Inception weights {INCEPTION_FILE} (pytorch-fid's port of the TensorFlow FID "
        f"network). Download {INCEPTION_URL} on a machine with internet, then pass --inception-weights PATH "
        f"(Python: inception_weights=PATH), set {INCEPTION_ENV}=PATH, or put it at {cache}."
    )
    explicit = weights or os.environ.get(INCEPTION_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            source = "given" if weights else f"named by ${INCEPTION_ENV}"
            raise MissingWeightsError(f"The Inception weights file {path} ({source}) does not exist. {help_text}")
        return path
    if cache.is_file():
        return cache
    if download:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(cache), progress=True)
            return cache
        except Exception as e:  # no network, proxy, ...
            raise MissingWeightsError(f"Could not download the Inception weights ({e}). {help_text}") from None
    raise MissingWeightsError(help_text)


def fid_inception_v3() -> torch.nn.Module:
    """The FID Inception-v3 architecture (pytorch-fid's TF-compatible blocks), with random weights."""
    from pytorch_fid.inception import (
        FIDInceptionA,
        FIDInceptionC,
        FIDInceptionE_1,
        FIDInceptionE_2,
        _inception_v3,
    )

    net = _inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


# Layers of the FID network up to the 2048-d pool3 features, in order (pytorch-fid's `InceptionV3` blocks 0-3).
_POOL3_LAYERS = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "avgpool",
)


class FeatureExtractor:
    """Maps images to a `(N, D)` float64 array. Subclasses set `name` (part of cache keys) and `_embed`."""

    name: str = ""

    def __init__(self, device: str | torch.device | None = None, batch_size: int = 32):
        self.device = default_device(device)
        self.batch_size = batch_size

    def _embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        chunks = [
            self._embed([im.convert("RGB") for im in images[i : i + self.batch_size]]).double().cpu().numpy()
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, 0))


class InceptionFeatures(FeatureExtractor):
    r"""
    2048-d pool3 features of the FID Inception-v3.

    Args:
        weights (`str`, *optional*): The weights file; see [`inception_weights_path`] for where else it is looked for.
        device (`str`, *optional*): Where to run (default: CUDA when available).
        batch_size (`int`, defaults to 32): Images per forward pass (same-size images are batched together).
        download (`bool`, defaults to `True`): Download the weights when no local file is found.
    """

    name = "inception"

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        download: bool = True,
    ):
        super().__init__(device, batch_size)
        net = fid_inception_v3()
        path = inception_weights_path(weights, download)
        net.load_state_dict(load_state_dict(path))
        self.net = net.eval().to(self.device)
        self.provenance = {
            "implementation": "FID Inception-v3 pool3 features (2048-d), pytorch-fid's port of the TensorFlow network",
            "resize": "bilinear to 299x299 (torch interpolate, align_corners=False), then scaled to [-1, 1]: values "
            "are comparable with pytorch-fid, not with clean-fid's or torchmetrics' defaults",
            "weights": str(path),
            "weights_sha256": file_sha256(path),
        }

    def _embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        from torchvision.transforms.functional import to_tensor

        out = []
        for size_group in _same_size_runs(images):
            x = torch.stack([to_tensor(im) for im in size_group]).to(self.device)
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            for name in _POOL3_LAYERS:
                x = getattr(self.net, name)(x)
            out.append(x.flatten(1))
        return torch.cat(out)


class ClipFeatures(FeatureExtractor):
    r"""
    L2-normalised image embeddings of an open_clip model (for "FID/KID in CLIP space").

    Args:
        model_name (`str`, defaults to `"ViT-L-14"`), checkpoint, pretrained: As for [`ClipScore`].
        device (`str`, *optional*), batch_size (`int`): As above.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        checkpoint: str | os.PathLike | None = None,
        pretrained: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ):
        super().__init__(device, batch_size)
        self.model, self.preprocess, _ = load_open_clip(model_name, checkpoint, pretrained, self.device)
        self.name = f"clip-{Path(str(model_name)).stem}"
        self.provenance = {
            "implementation": "L2-normalised open_clip image embeddings, open_clip image transform",
            **clip_weights(model_name, checkpoint, pretrained),
        }

    def _embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)


def _same_size_runs(images: Sequence[Image.Image]) -> list[list[Image.Image]]:
    """Consecutive runs of equally sized images (a batch must share one size before resizing)."""
    runs: list[list[Image.Image]] = []
    for im in images:
        if runs and runs[-1][0].size == im.size:
            runs[-1].append(im)
        else:
            runs.append([im])
    return runs
