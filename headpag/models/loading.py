"""Loading a head-PAG pipeline from a hub id, a local diffusers folder or a tiny offline model name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers.utils import logging

from ..pipelines.flux import FluxHeadPAGImg2ImgPipeline, FluxHeadPAGPipeline
from ..pipelines.sd3 import StableDiffusion3HeadPAGImg2ImgPipeline, StableDiffusion3HeadPAGPipeline
from .catalog import builtin_folder, builtin_models, offline_models
from .tiny import TINY_MODELS, tiny_components


logger = logging.get_logger(__name__)

PIPELINES = {
    ("sd3", False): StableDiffusion3HeadPAGPipeline,
    ("sd3", True): StableDiffusion3HeadPAGImg2ImgPipeline,
    ("flux", False): FluxHeadPAGPipeline,
    ("flux", True): FluxHeadPAGImg2ImgPipeline,
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def family_of_class_name(class_name: str, source: str) -> str:
    """`"sd3"` or `"flux"` from a pipeline class name in `model_index.json`; `ValueError` for anything else."""
    if "StableDiffusion3" in class_name:
        return "sd3"
    if class_name.startswith("Flux") and "Kontext" not in class_name and "Fill" not in class_name:
        return "flux"
    raise ValueError(
        f"Unknown model family: {source} is a {class_name!r}; head-level PAG supports Stable Diffusion 3 / 3.5 "
        f"and FLUX.1 pipelines (or the offline models {', '.join(offline_models())})."
    )


def detect_family(model: str) -> str:
    """The family of a local folder or hub id, read from its `model_index.json`."""
    folder = Path(model)
    if folder.is_dir():
        index = folder / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json.")
        return family_of_class_name(json.loads(index.read_text())["_class_name"], str(folder))
    if os.path.sep in model and not folder.exists() and model.count("/") != 1:
        raise ValueError(f"Model folder {model} does not exist.")
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(model)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; all mean "cannot get it"
        raise ValueError(
            f"Cannot load {model!r}: it is not a local folder and the Hugging Face Hub could not be reached or "
            f"refused it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download the model and "
            "pass its local folder, log in with `hf auth login` for gated repos, or try an offline model: "
            f"{', '.join(offline_models())}."
        ) from e
    return family_of_class_name(config["_class_name"], model)


def load_pipeline(
    model: str,
    img2img: bool = False,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    **kwargs,
):
    r"""
    Load the head-PAG pipeline that fits `model`.

    Args:
        model (`str`): A hub id (`"stabilityai/stable-diffusion-3-medium-diffusers"`), a local diffusers folder, or
            an offline model: `headpag-shapes` (the trained shapes testbed, shipped in the package),
            `headpag-shapes-flux` (its FLUX sibling), or one of the random-weight models `tiny-sd3`, `tiny-sd35`,
            `tiny-flux`.
        img2img (`bool`, defaults to `False`): Load the img2img variant.
        torch_dtype (`torch.dtype` or `str`, *optional*): `float16`, `bfloat16` or `float32`.
        device (`str`, *optional*): Where to move the pipeline.
        **kwargs: Passed to `from_pretrained` (e.g. `pag_heads`, `variant`).

    Raises:
        `ValueError`: unknown model family, missing folder, or an unreachable hub (with what to do instead).
    """
    if isinstance(torch_dtype, str):
        if torch_dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {torch_dtype!r}; allowed: {', '.join(DTYPES)}.")
        torch_dtype = DTYPES[torch_dtype]
    if model in TINY_MODELS:
        family, components = tiny_components(model)
        pipe = PIPELINES[(family, img2img)](**components, **kwargs)
        if torch_dtype is not None and torch_dtype != torch.float32:
            pipe = pipe.to(dtype=torch_dtype)
    else:
        if model in builtin_models():
            model = str(builtin_folder(model))
        family = detect_family(model)
        cls = PIPELINES[(family, img2img)]
        pipe = cls.from_pretrained(model, torch_dtype=torch_dtype, **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    return pipe
