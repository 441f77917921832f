"""FLUX.1 pipelines with head-level PAG."""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..guidance.heads import HeadSet
from .mixin import HeadPAGMixin


class FluxHeadPAGPipeline(HeadPAGMixin, FluxPipeline):
    r"""
    [`FluxPipeline`] with head-level perturbed-attention guidance (PAG / SoftPAG, HeadHunter).

    `v = v_u + g (v_c - v_u) + s (v_c - v_p)` with `g = true_cfg_scale` (only with a negative prompt) and
    `s = pag_scale`; `guidance_scale` keeps diffusers' meaning (the distilled guidance embedding, default 3.5). Layers
    0-18 are the double-stream blocks of FLUX.1, 19-56 the single-stream ones; the joint order is `[text, image]`.

    Args:
        pag_heads (*optional*): Default head set; all heads of layer 8 when `None` (see docs/scripting.md,
            "Default heads").
        pag_sequential (`bool`, defaults to `False`): Run the perturbed branch as its own call by default.
        (other arguments): as [`FluxPipeline`].
    """

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        pag_heads: HeadSet | str | list | None = None,
        pag_sequential: bool = False,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self._init_head_pag(pag_heads, pag_sequential)


class FluxHeadPAGImg2ImgPipeline(HeadPAGMixin, FluxImg2ImgPipeline):
    r"""[`FluxImg2ImgPipeline`] with head-level PAG; same extra arguments as [`FluxHeadPAGPipeline`]."""

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        pag_heads: HeadSet | str | list | None = None,
        pag_sequential: bool = False,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self._init_head_pag(pag_heads, pag_sequential)
