"""CLIP score with open_clip: mean over pairs of `100 * cos(image, text)`, clamped at 0 (torchmetrics' definition)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers.utils import logging
from PIL import Image

from .base import PairMetric, clip_pixels, default_device
from .provenance import file_sha256


logger = logging.get_logger(__name__)

CHECKPOINT_ENV = "HEADPAG_CLIP_CHECKPOINT"


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint as a state dict: safetensors, or a torch file loaded with `weights_only=True` (never pickle)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return _unwrap(state)


def _unwrap(state):
    """A checkpoint's state dict: the one under `"state_dict"` when nested there, `module.` prefixes (DDP) dropped."""
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return _strip(state) if isinstance(state, dict) else state


def _strip(state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state.items()}


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes of a checkpoint, read without loading its tensors (a safetensors header, or a
    torch file memory-mapped with `weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint file {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                shapes = _strip({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            _check_torch_archive(path)
            state = _unwrap(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError("not a state dict of tensors")
            shapes = {k: tuple(v.shape) for k, v in state.items()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is "not a checkpoint"
        raise ValueError(f"{path.name} is not a readable checkpoint ({type(e).__name__}).") from None
    return shapes


MAX_PICKLE_BYTES = 64 << 20  # the pickled structure of a torch checkpoint (names and shapes; the tensors are apart)


def _check_torch_archive(path: Path) -> None:
    """A torch checkpoint must be a zip archive whose entries are stored (not compressed: nothing inflates past its
    file size) and whose pickled structure is small, before `torch.load` reads anything."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"compressed entry {info.filename}")
            if info.filename.endswith(".pkl") and info.file_size > MAX_PICKLE_BYTES:
                raise ValueError(f"pickled structure of {info.file_size} bytes")


def check_checkpoint_fits(model_name: str, checkpoint: str | os.PathLike) -> None:
    """
    Refuse a checkpoint whose parameter names or shapes are not those of the open_clip model `model_name`, before
    any parameter is allocated: the model is built on the meta device and compared with the checkpoint's header.
    """
    import open_clip

    with torch.device("meta"):
        expected = {
            k: tuple(v.shape) for k, v in open_clip.create_model(model_name, device="meta").state_dict().items()
        }
    got = checkpoint_shapes(checkpoint)
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        examples = (missing + unexpected + wrong)[:3]
        raise ValueError(
            f"The checkpoint {Path(checkpoint).name} does not fit the CLIP model {model_name!r}: {len(missing)} "
            f"parameter(s) missing, {len(unexpected)} unexpected, {len(wrong)} of another shape (e.g. "
            f"{', '.join(examples)}); nothing was built. Use the checkpoint of that model."
        )


def load_open_clip(
    model_name: str,
    checkpoint: str | os.PathLike | None = None,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
):
    r"""
    An open_clip model in eval mode with its image transform and tokenizer (shared by CLIP score and CLIP features).

    Args:
        model_name (`str`): An open_clip model name, or a path to a model config JSON (registered under its stem).
        checkpoint (`str`, *optional*): A local `.safetensors` file or torch file (read with `weights_only=True`);
            defaults to `$HEADPAG_CLIP_CHECKPOINT`.
        pretrained (`str`, *optional*): An open_clip pretrained tag, downloaded when the hub is reachable.

    Raises:
        `ValueError`: with neither a checkpoint nor a pretrained tag: metrics never run on random weights.
        device (`str`): Where to put the model.
    """
    import open_clip

    checkpoint = checkpoint or os.environ.get(CHECKPOINT_ENV) or None
    if checkpoint is None and pretrained is None:
        raise ValueError(
            f"No weights for the CLIP model {model_name!r}: a metric never runs on random weights. Pass a local "
            f"checkpoint of that open_clip model (`--clip-checkpoint FILE` in `headpag eval`, `--objective-model "
            f"FILE` in `headpag hunt`, `checkpoint=` in Python, or ${CHECKPOINT_ENV}; .safetensors, or a torch file "
            "read with weights_only=True), or an open_clip pretrained tag to download (`--clip-pretrained TAG`, "
            "e.g. 'openai')."
        )
    if str(model_name).endswith(".json"):
        config_path = Path(model_name)
        if not config_path.is_file():
            raise ValueError(f"open_clip model config {config_path} does not exist.")
        json.loads(config_path.read_text())  # validate early
        open_clip.add_model_config(config_path)
        model_name = config_path.stem
    if checkpoint is not None:  # names and shapes checked against the model built on the meta device: no allocation
        check_checkpoint_fits(model_name, checkpoint)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    if checkpoint is not None:
        model.load_state_dict(load_state_dict(checkpoint))
    return model.eval().to(device), preprocess, open_clip.get_tokenizer(model_name)


def clip_weights(model_name, checkpoint, pretrained) -> dict:
    """The model and weights an open_clip metric loaded (with the checkpoint's SHA-256)."""
    checkpoint = checkpoint or os.environ.get(CHECKPOINT_ENV) or None
    return {
        "model": str(model_name),
        "weights": None if checkpoint is None else str(checkpoint),
        "weights_sha256": file_sha256(checkpoint),
        "pretrained": pretrained,
    }


class ClipScore(PairMetric):
    r"""
    CLIP score of image-prompt pairs with an open_clip model.

    Args:
        model_name (`str`, defaults to `"ViT-L-14"`): An open_clip model name, or a path to a model config JSON
            (registered under its file stem).
        checkpoint (`str`, *optional*): A local checkpoint file (`.safetensors`, or a torch file read with
            `weights_only=True`).
        pretrained (`str`, *optional*): An open_clip pretrained tag (e.g. `"openai"`), downloaded when the hub is
            reachable. With neither (and no `$HEADPAG_CLIP_CHECKPOINT`), a `ValueError` says what to supply.
        device (`str`, *optional*): Where to run (default: CUDA when available).
        batch_size (`int`, defaults to 32): Images per forward pass.

    Use as a function (`scores = clip(images, prompts)`, one float per pair: a HeadHunter objective) or as a metric
    (`update(images, prompts)`, then `compute()` for the mean).
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        checkpoint: str | os.PathLike | None = None,
        pretrained: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ):
        self.device = default_device(device)
        self.model, self.preprocess, self.tokenizer = load_open_clip(model_name, checkpoint, pretrained, self.device)
        self.provenance = {
            "implementation": "CLIP score: mean of max(100 cos(image, text), 0) (torchmetrics' definition), open_clip "
            "image transform",
            **clip_weights(model_name, checkpoint, pretrained),
        }
        self.batch_size = batch_size
        self.reset()

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """Per-pair CLIP scores `max(100 * cos, 0)`."""
        pixels = torch.stack([self.preprocess(im) for im in images])
        img = self.model.encode_image(pixels.to(self.device)).float()
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return (100 * cos).clamp(min=0).tolist()

    # ------------------------------------------------------------------ differentiable path
    differentiable = True

    def __call__(self, images, prompts):
        """PIL images: `list[float]` (see [`PairMetric.score`]); a float tensor: [`ClipScore.score_tensor`]."""
        if isinstance(images, torch.Tensor):
            return self.score_tensor(images, prompts)
        return self.score(images, prompts)

    def _transform_parts(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """`(image size, mean, std)` of the open_clip image transform."""
        from torchvision import transforms

        size, mean, std = None, None, None
        for t in getattr(self.preprocess, "transforms", []):
            if isinstance(t, transforms.Normalize):
                mean, std = t.mean, t.std
            elif isinstance(t, transforms.CenterCrop):
                size = t.size[0] if isinstance(t.size, (tuple, list)) else t.size
        if size is None:
            size = self.model.visual.image_size
            size = size[0] if isinstance(size, (tuple, list)) else size
        if mean is None:
            mean, std = self.model.visual.image_mean, self.model.visual.image_std
        return int(size), torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def score_tensor(self, pixels: torch.Tensor, prompts) -> torch.Tensor:
        r"""
        Differentiable CLIP scores `max(100 * cos, 0)` of a float image batch (gradients flow to `pixels`).

        The open_clip transform in torch: bicubic resize of the shortest side to the model's size (antialiased),
        center crop, normalization; at the model's resolution it is the PIL path up to uint8 quantization.

        Args:
            pixels (`torch.Tensor`): `(B, 3, H, W)` RGB in `[0, 1]`.
            prompts (`list[str]`): One prompt per image.

        Returns:
            `torch.Tensor`: `(B,)` scores (higher is better).
        """
        size, mean, std = self._transform_parts()
        x = clip_pixels(pixels, prompts, size, size, mean, std, self.device)
        img = self.model.encode_image(x).float()
        with torch.no_grad():
            txt = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return (100 * cos).clamp(min=0)
