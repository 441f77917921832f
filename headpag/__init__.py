"""headpag: head-level perturbed-attention guidance (PAG, SoftPAG) and HeadHunter for SD3, SD3.5 and FLUX.1."""

from .guidance import HeadSet, Perturbation
from .guidance.presets import list_presets, load_preset
from .models import load_pipeline
from .pipelines import (
    FluxHeadPAGImg2ImgPipeline,
    FluxHeadPAGPipeline,
    HeadPerturbedAttentionGuidance,
    StableDiffusion3HeadPAGImg2ImgPipeline,
    StableDiffusion3HeadPAGPipeline,
    head_pag,
)


__version__ = "0.1.0"
__all__ = [
    "FluxHeadPAGImg2ImgPipeline",
    "FluxHeadPAGPipeline",
    "HeadPerturbedAttentionGuidance",
    "HeadSet",
    "Perturbation",
    "StableDiffusion3HeadPAGImg2ImgPipeline",
    "StableDiffusion3HeadPAGPipeline",
    "__version__",
    "head_pag",
    "list_presets",
    "load_pipeline",
    "load_preset",
]
