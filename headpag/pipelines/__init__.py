"""diffusers pipelines with head-level PAG: thin subclasses of the SD3 and FLUX pipelines."""

from .flux import FluxHeadPAGImg2ImgPipeline, FluxHeadPAGPipeline
from .loading import PIPELINES, detect_family, load_pipeline
from .mixin import DEFAULT_LAYER, HeadPAGMixin, PAGOptions, default_pag_heads
from .sd3 import StableDiffusion3HeadPAGImg2ImgPipeline, StableDiffusion3HeadPAGPipeline


__all__ = [
    "DEFAULT_LAYER",
    "PIPELINES",
    "FluxHeadPAGImg2ImgPipeline",
    "FluxHeadPAGPipeline",
    "HeadPAGMixin",
    "PAGOptions",
    "StableDiffusion3HeadPAGImg2ImgPipeline",
    "StableDiffusion3HeadPAGPipeline",
    "default_pag_heads",
    "detect_family",
    "load_pipeline",
]
