"""diffusers pipelines with head-level PAG: `head_pag(pipe)` for any SD3/FLUX pipeline, and four thin subclasses."""

from .attach import DEFAULT_LAYER, default_pag_heads, head_pag
from .flux import FluxHeadPAGImg2ImgPipeline, FluxHeadPAGPipeline
from .guider import HeadPerturbedAttentionGuidance
from .mixin import HeadPAGMixin
from .policy import PAGOptions
from .sd3 import StableDiffusion3HeadPAGImg2ImgPipeline, StableDiffusion3HeadPAGPipeline


__all__ = [
    "DEFAULT_LAYER",
    "FluxHeadPAGImg2ImgPipeline",
    "FluxHeadPAGPipeline",
    "HeadPAGMixin",
    "HeadPerturbedAttentionGuidance",
    "PAGOptions",
    "StableDiffusion3HeadPAGImg2ImgPipeline",
    "StableDiffusion3HeadPAGPipeline",
    "default_pag_heads",
    "head_pag",
]
