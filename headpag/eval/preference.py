"""
Preference metrics of the paper's Table 1 on open_clip: the LAION aesthetic score and HPSv2.

Both are an open_clip model plus a small, published piece, so they load with open_clip (a well-kept library) and
local weights, never random ones:

- **LAION aesthetic** (improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE.pth`): a stack of linear layers on
  the L2-normalised CLIP ViT-L/14 image embedding. The head is built from the weights file itself (every
  `layers.<i>.weight` is one `Linear`, in order; the dropouts between them do nothing at inference).
- **HPSv2 / v2.1** (`HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt`, hub `xswu/HPSv2`): a fine-tuned open_clip
  ViT-H-14; the score is the cosine of image and text embeddings, as in the `hpsv2` package.

- **ImageReward** (`ImageReward.pt`, hub `THUDM/ImageReward`): BLIP (ViT-L/16 at 224² + a BERT-base text encoder
  with cross-attention) and a linear head on the text encoder's first token, normalised by the published mean and
  std. The networks are transformers' `BlipVisionModel` and `BlipTextModel`; the checkpoint's keys (original BLIP
  names) are renamed to theirs.

The `hpsv2` package pins `pytest==7.2.0` and `protobuf<4`, and `image-reward` pins `timm==0.6.13`; installing either
would break this project's environment, so neither is a dependency. MPS is not offered: the maintained package that
has it (`imscore`) builds its full-size backbone from the hub inside its constructor, so it cannot load offline.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .base import check_pairs, clip_pixels
from .clip_score import ClipScore, load_state_dict
from .provenance import file_sha256


AESTHETIC_ENV = "HEADPAG_AESTHETIC_HEAD"
HPS_ENV = "HEADPAG_HPS_CHECKPOINT"
HPS_HUB = ("xswu/HPSv2", "HPS_v2.1_compressed.pt")
IMAGEREWARD_ENV = "HEADPAG_IMAGEREWARD_CHECKPOINT"
IMAGEREWARD_HUB = ("THUDM/ImageReward", "ImageReward.pt")
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's reward normalisation
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


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


# ImageReward's full-size BLIP; tests pass smaller `vision` / `text` settings
IMAGEREWARD_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu",
)  # fmt: skip
IMAGEREWARD_TEXT = dict(
    vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True,
)  # fmt: skip


def imagereward_key(key: str) -> str | None:
    """An original-BLIP ImageReward checkpoint key as transformers' BLIP names it (`None`: not used for scoring)."""
    if key.startswith("blip.visual_encoder."):
        k = key.removeprefix("blip.visual_encoder.")
        k = k.replace("patch_embed.proj", "embeddings.patch_embedding")
        k = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}.get(k, k)
        k = re.sub(r"^blocks\.(\d+)\.", r"encoder.layers.\1.", k)
        k = k.replace(".norm1.", ".layer_norm1.").replace(".norm2.", ".layer_norm2.")
        k = k.replace(".attn.qkv.", ".self_attn.qkv.").replace(".attn.proj.", ".self_attn.projection.")
        k = re.sub(r"^norm\.", "post_layernorm.", k)
        return "vision_model." + k
    if key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
        return "text_encoder." + key.removeprefix("blip.text_encoder.")
    return None


class ImageRewardScore(torch.nn.Module):
    r"""
    ImageReward of image–prompt pairs (higher is better; normalised so that its training set has mean 0, std 1).

    Args:
        checkpoint (`str`, *optional*): `ImageReward.pt` (a torch file read with `weights_only=True`, or
            `.safetensors`); defaults to `$HEADPAG_IMAGEREWARD_CHECKPOINT`, then a download of
            `THUDM/ImageReward/ImageReward.pt` when the hub is reachable.
        tokenizer (`str`, defaults to `"bert-base-uncased"`): A BERT tokenizer folder or hub id; `[DEC]` and `[ENC]`
            are added as ImageReward does.
        device (`str`, *optional*), batch_size (`int`): Where to run; pairs per forward pass.
        vision, text (`dict`, *optional*): BLIP settings replacing the full-size ones (tests build small models).
    """

    differentiable = True

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        tokenizer: str = "bert-base-uncased",
        device: str | torch.device | None = None,
        batch_size: int = 16,
        vision: dict | None = None,
        text: dict | None = None,
    ):
        super().__init__()
        from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        from .base import default_device

        checkpoint = checkpoint or os.environ.get(IMAGEREWARD_ENV) or None
        if checkpoint is None:
            checkpoint = _download(*IMAGEREWARD_HUB, what="ImageReward", flag="--imagereward-checkpoint",
                                   env=IMAGEREWARD_ENV)  # fmt: skip
        state = load_state_dict(checkpoint)
        self.device = default_device(device)
        self.batch_size = batch_size
        self.vision_model = BlipVisionModel(BlipVisionConfig(**(vision or IMAGEREWARD_VISION)))
        self.text_encoder = BlipTextModel(BlipTextConfig(**(text or IMAGEREWARD_TEXT)), add_pooling_layer=False)
        renamed = {name: v for k, v in state.items() if (name := imagereward_key(k)) is not None}
        own = self.state_dict()
        missing = [k for k in own if k not in renamed and not k.endswith("position_ids")]
        unexpected = [k for k in renamed if k not in own]
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} is not an ImageReward checkpoint of this size: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]} ({len(missing)} / {len(unexpected)} in all)."
            )
        self.load_state_dict(renamed, strict=False)
        self.head = linear_stack(state, "mlp.layers.")
        try:
            self.tokenizer = BertTokenizer.from_pretrained(tokenizer)
        except Exception as e:  # noqa: BLE001 - offline or missing: say what to supply
            raise ValueError(
                f"Cannot load the BERT tokenizer {tokenizer!r} for ImageReward ({type(e).__name__}): pass a local "
                "folder with bert-base-uncased's tokenizer files (--imagereward-tokenizer DIR)."
            ) from None
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        self.eval().requires_grad_(False).to(self.device)
        self.image_size = self.vision_model.config.image_size
        self.provenance = {
            "implementation": "ImageReward: transformers BLIP (renamed original keys), linear head on the first text "
            "token, (r - 0.1672) / 1.0333; bicubic resize and center crop to the model size, CLIP normalisation",
            "weights": str(checkpoint),
            "weights_sha256": file_sha256(checkpoint),
            "tokenizer": str(tokenizer),
        }

    def score_tensor(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Differentiable ImageReward of a `(B, 3, H, W)` batch in `[0, 1]`, one prompt each."""
        size = self.image_size
        x = clip_pixels(pixels, prompts, size, size, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD), self.device)
        embeds = self.vision_model(pixel_values=x).last_hidden_state
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                              return_tensors="pt").to(self.device)  # fmt: skip
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        out = self.text_encoder(
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
        ).last_hidden_state[:, 0]
        return (self.head(out)[:, 0] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        check_pairs(images, prompts)
        from torchvision.transforms.functional import to_tensor

        out: list[float] = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            sizes = {im.size for im in chunk}
            pixels = [to_tensor(im.convert("RGB"))[None] for im in chunk]
            if len(sizes) == 1:
                out += self.score_tensor(torch.cat(pixels), prompts[i : i + self.batch_size]).tolist()
            else:
                out += [self.score_tensor(p, [t]).item() for p, t in zip(pixels, prompts[i : i + self.batch_size])]
        return out

    def __call__(self, images, prompts):
        """PIL images: `list[float]`; a float tensor: [`ImageRewardScore.score_tensor`] (differentiable)."""
        if isinstance(images, torch.Tensor):
            return self.score_tensor(images, prompts)
        return self.score(images, prompts)


def _download(
    repo: str, filename: str, what: str = "HPSv2", flag: str = "--hps-checkpoint", env: str = HPS_ENV
) -> str:
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, filename)
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: all mean "supply the file"
        raise ValueError(
            f"No weights for {what}: a metric never runs on random weights, and {repo}/{filename} could not be "
            f"downloaded ({type(e).__name__}). Download it on a machine with internet and pass {flag} FILE "
            f"(Python: checkpoint=FILE) or ${env}."
        ) from None
