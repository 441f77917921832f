"""
Preference metrics of the paper's Table 1 on open_clip: the LAION aesthetic score and HPSv2.

Both are an open_clip model plus a small, published piece, so they load with open_clip (a well-kept library) and
local weights, never random ones:

- **LAION aesthetic** (improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE.pth`): a stack of linear layers on
  the L2-normalised CLIP ViT-L/14 image embedding. The head is built from the weights file itself (every
  `layers.<i>.weight` is one `Linear`, in order; the dropouts between them do nothing at inference).
- **HPSv2 / v2.1** (`HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt`, hub `xswu/HPSv2`): a fine-tuned open_clip
  ViT-H-14; the score is the cosine of image and text embeddings, as in the `hpsv2` package.

The `hpsv2` package itself pins `pytest==7.2.0` and `protobuf<4`, and `image-reward` pins `timm==0.6.13`; installing
either would break this project's environment, so neither is a dependency. ImageReward and MPS are not offered: the
maintained package that has them (`imscore`) hard-codes full-size backbones downloaded from the hub in its
constructors, so they cannot load from local files alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .base import clip_pixels
from .clip_score import ClipScore, load_state_dict
from .provenance import file_sha256


AESTHETIC_ENV = "HEADPAG_AESTHETIC_HEAD"
HPS_ENV = "HEADPAG_HPS_CHECKPOINT"
HPS_HUB = ("xswu/HPSv2", "HPS_v2.1_compressed.pt")


def linear_stack(state: dict[str, torch.Tensor], prefix: str = "layers.") -> torch.nn.Sequential:
    """The `Linear` layers of a state dict (`{prefix}<i>.weight/bias`), in index order, loaded."""
    indices = sorted({int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)})
    if not indices:
        raise ValueError(f"The aesthetic head has no '{prefix}<i>.weight' entries; keys: {sorted(state)[:6]}...")
    layers = []
    for i in indices:
        weight, bias = state[f"{prefix}{i}.weight"], state.get(f"{prefix}{i}.bias")
        if weight.ndim != 2:
            raise ValueError(f"{prefix}{i}.weight has shape {tuple(weight.shape)}; a linear head was expected.")
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        layer.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})})
        layers.append(layer)
    for a, b in zip(layers, layers[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"The aesthetic head's layers do not chain: {a} then {b}.")
    if layers[-1].out_features != 1:
        raise ValueError(f"The aesthetic head must end in one output, got {layers[-1].out_features}.")
    return torch.nn.Sequential(*layers).eval()


class AestheticScore(ClipScore):
    r"""
    LAION aesthetic score (1–10 scale on real images) of images; prompts are ignored.

    Args:
        head (`str`): The predictor's weights (`sac+logos+ava1-l14-linearMSE.pth`, a torch file read with
            `weights_only=True`, or `.safetensors`); defaults to `$HEADPAG_AESTHETIC_HEAD`.
        model_name, checkpoint, pretrained: The CLIP image encoder, as for [`ClipScore`] (the predictor was trained
            on OpenAI's ViT-L-14: `pretrained="openai"` or a local checkpoint of it).
        device (`str`, *optional*), batch_size (`int`): As for [`ClipScore`].
    """

    def __init__(
        self,
        head: str | os.PathLike | None = None,
        model_name: str = "ViT-L-14",
        checkpoint: str | os.PathLike | None = None,
        pretrained: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ):
        head = head or os.environ.get(AESTHETIC_ENV) or None
        if head is None or not Path(head).is_file():
            raise ValueError(
                f"No weights for the aesthetic head ({head or 'none given'}): a metric never runs on random weights. "
                "Download sac+logos+ava1-l14-linearMSE.pth (github.com/christophschuhmann/improved-aesthetic-"
                f"predictor) and pass it as --aesthetic-head FILE (Python: head=FILE) or ${AESTHETIC_ENV}; the CLIP "
                "encoder comes from --clip-checkpoint / --clip-pretrained openai."
            )
        super().__init__(model_name, checkpoint, pretrained, device, batch_size)
        self.head = linear_stack(load_state_dict(head)).to(self.device)
        self.provenance = {
            **self.provenance,
            "implementation": "LAION aesthetic predictor: linear head on the L2-normalised open_clip image embedding",
            "head": str(head),
            "head_sha256": file_sha256(head),
        }

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        img = self.model.encode_image(pixels).float()
        return self.head(torch.nn.functional.normalize(img, dim=-1))[:, 0]

    @torch.no_grad()
    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self._embed(pixels).tolist()

    def score_tensor(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Differentiable aesthetic scores of a `(B, 3, H, W)` batch in `[0, 1]` (prompts only counted)."""
        size, mean, std = self._transform_parts()
        return self._embed(clip_pixels(pixels, prompts, size, size, mean, std, self.device))


class HPSv2Score(ClipScore):
    r"""
    Human Preference Score v2 / v2.1: `cos(image, text)` of the HPS-fine-tuned open_clip ViT-H-14.

    Args:
        checkpoint (`str`, *optional*): `HPS_v2.1_compressed.pt` (or v2; a torch file read with `weights_only=True`,
            its `state_dict` entry is used); defaults to `$HEADPAG_HPS_CHECKPOINT`, then a download of
            `xswu/HPSv2/HPS_v2.1_compressed.pt` when the hub is reachable.
        model_name (`str`, defaults to `"ViT-H-14"`): The open_clip architecture (a config JSON for tests).
        device (`str`, *optional*), batch_size (`int`): As for [`ClipScore`].
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        model_name: str = "ViT-H-14",
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ):
        checkpoint = checkpoint or os.environ.get(HPS_ENV) or None
        if checkpoint is None:
            checkpoint = _download(*HPS_HUB)
        super().__init__(model_name, checkpoint, None, device, batch_size)
        self.provenance["implementation"] = "HPSv2: cos(image, text) of the HPS open_clip model (hpsv2's definition)"

    def _cosines(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        img = self.model.encode_image(pixels).float()
        with torch.no_grad():
            txt = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float()
        return torch.nn.functional.cosine_similarity(img, txt, dim=-1)

    @torch.no_grad()
    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self._cosines(pixels, prompts).tolist()

    def score_tensor(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Differentiable HPS of a `(B, 3, H, W)` batch in `[0, 1]`."""
        size, mean, std = self._transform_parts()
        return self._cosines(clip_pixels(pixels, prompts, size, size, mean, std, self.device), prompts)


def _download(repo: str, filename: str) -> str:
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, filename)
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: all mean "supply the file"
        raise ValueError(
            f"No weights for HPSv2: a metric never runs on random weights, and {repo}/{filename} could not be "
            f"downloaded ({type(e).__name__}). Download it on a machine with internet and pass --hps-checkpoint FILE "
            f"(Python: checkpoint=FILE) or ${HPS_ENV}."
        ) from None
