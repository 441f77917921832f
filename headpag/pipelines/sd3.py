"""Stable Diffusion 3 / 3.5 pipelines with head-level PAG."""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..guidance.heads import HeadSet
from .mixin import HeadPAGMixin


class StableDiffusion3HeadPAGPipeline(HeadPAGMixin, StableDiffusion3Pipeline):
    r"""
    [`StableDiffusion3Pipeline`] with head-level perturbed-attention guidance (PAG / SoftPAG, HeadHunter).

    `v = v_u + g (v_c - v_u) + s (v_c - v_p)` with `g = guidance_scale` (CFG off when `g <= 1`) and `s = pag_scale`;
    `v_p` is the conditional prediction with the heads of `pag_heads` perturbed. Works for SD3 and SD3.5 (qk-norm,
    dual attention). With CFG, one transformer call per step carries `[uncond, cond, perturbed]`; the PAG term joins
    the prediction at the scheduler step, so skip-layer guidance (`skip_guidance_layers`) keeps its own meaning.

    ```py
    >>> from headpag import StableDiffusion3HeadPAGPipeline
    >>> pipe = StableDiffusion3HeadPAGPipeline.from_pretrained(
    ...     "stabilityai/stable-diffusion-3-medium-diffusers", torch_dtype=torch.float16
    ... ).to("cuda")
    >>> image = pipe("a photo of a cat", pag_heads="11.15, 7", pag_scale=3.0, pag_identity_weight=0.5).images[0]
    ```

    Args:
        pag_heads (*optional*): Default head set (spec string, pairs, layers or `HeadSet`); all heads of layer 7
            when `None`.
        pag_sequential (`bool`, defaults to `False`): Run the perturbed branch as its own call by default.
        (other arguments): as [`StableDiffusion3Pipeline`].
    """

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
        image_encoder: SiglipVisionModel | None = None,
        feature_extractor: SiglipImageProcessor | None = None,
        pag_heads: HeadSet | str | list | None = None,
        pag_sequential: bool = False,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self._init_head_pag(pag_heads, pag_sequential)


class StableDiffusion3HeadPAGImg2ImgPipeline(HeadPAGMixin, StableDiffusion3Img2ImgPipeline):
    r"""
    [`StableDiffusion3Img2ImgPipeline`] with head-level PAG; same extra arguments as
    [`StableDiffusion3HeadPAGPipeline`]. PAG's interval counts the steps that img2img actually runs.
    """

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
        image_encoder: SiglipVisionModel | None = None,
        feature_extractor: SiglipImageProcessor | None = None,
        pag_heads: HeadSet | str | list | None = None,
        pag_sequential: bool = False,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self._init_head_pag(pag_heads, pag_sequential)
