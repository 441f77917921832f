"""
One generation's settings, with the same names as the pipeline arguments, shared by the CLI, search, eval and UI.

Guidance names keep their diffusers meaning in every family: `guidance_scale` is SD3's CFG scale and FLUX's distilled
guidance embedding; `true_cfg_scale` is FLUX's real CFG (with a negative prompt) and does not exist for SD3.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..guidance import HeadSet, Perturbation
from .attach import default_pag_heads, open_block, transformer_layout
from .model_config import BUILTIN_PAG_DEFAULTS, over_builtin, recommended
from .policy import PAGOptions


PAG_FIELDS = (
    "pag_scale",
    "pag_identity_weight",
    "pag_identity_scope",
    "pag_target",
    "pag_interval",
    "pag_adaptive_scale",
    "pag_reuse",
)


@dataclass
class GenerationSettings:
    r"""
    Settings of one generation. `None` means the pipeline's own default; for the `pag_*` values that is the model's
    recommendation (`headpag_config.json`, see [`~pipelines.model_config`]), else the built-in default
    ([`with_model_defaults`] spells them out, so that the metadata says what ran).

    Args:
        prompt (`str`): The prompt.
        negative_prompt (`str`, *optional*): Negative prompt (SD3 CFG, FLUX true CFG).
        pag_heads (`str`, *optional*): Head spec; `None` = the pipeline default.
        pag_scale (`float`, *optional*): PAG scale `s`; 0 disables PAG.
        pag_identity_weight (`float`, *optional*): SoftPAG `u` in [0, 1].
        pag_identity_scope (`str`, *optional*): `"joint"` or `"image"`.
        pag_target (`str`, *optional*): `"identity"`, `"uniform"` or `"query_mean"`.
        pag_interval (`tuple[float, float]`, *optional*): Fractions of the steps with PAG.
        pag_adaptive_scale (`float`, *optional*): diffusers' adaptive schedule.
        pag_reuse (`int`, *optional*): The perturbed branch on steps 0, k, 2k, ... of the interval; reused in
            between.
        guidance_scale (`float`, *optional*): SD3 CFG scale / FLUX guidance embedding.
        true_cfg_scale (`float`, *optional*): FLUX only: true CFG scale.
        num_inference_steps, height, width (`int`, *optional*): As in diffusers.
        seed (`int`): Seed of a CPU `torch.Generator` (reproducible across devices).
        num_images (`int`): Images per prompt.
        strength (`float`, *optional*): img2img strength.
    """

    prompt: str = ""
    negative_prompt: str | None = None
    pag_heads: str | None = None
    pag_scale: float | None = None
    pag_identity_weight: float | None = None
    pag_identity_scope: str | None = None
    pag_target: str | None = None
    pag_interval: tuple[float, float] | None = None
    pag_adaptive_scale: float | None = None
    pag_reuse: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    num_inference_steps: int | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    seed: int = 0
    num_images: int = 1
    strength: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Checks that need no model: finite numbers in range, counts, the PAG options and the head spec's syntax."""
        for name in ("guidance_scale", "true_cfg_scale", "strength"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}.")
        for name in ("num_inference_steps", "height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        msl = self.max_sequence_length
        if msl is not None and (isinstance(msl, bool) or not isinstance(msl, int) or not 1 <= msl <= 512):
            raise ValueError(f"max_sequence_length must be an integer in [1, 512] (the T5 limit), got {msl!r}.")
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1, got {self.num_images!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}.")
        self.pag_options()
        if self.pag_heads is not None:
            HeadSet.parse(self.pag_heads)

    def pag_value(self, name: str) -> Any:
        """A `pag_*` value, the built-in default where it is `None` (before the model's defaults are known)."""
        value = getattr(self, name)
        return BUILTIN_PAG_DEFAULTS[name] if value is None else value

    def pag_options(self) -> PAGOptions:
        """The validated PAG options (the pipeline's own checks of u, scope, target, scales, interval and reuse)."""
        v = self.pag_value
        return PAGOptions(
            scale=v("pag_scale"),
            perturbation=Perturbation(v("pag_identity_weight"), v("pag_identity_scope"), v("pag_target")),
            interval=tuple(v("pag_interval")),
            adaptive_scale=v("pag_adaptive_scale"),
            reuse=v("pag_reuse"),
        )

    def validate(self, family: str) -> None:
        """All checks, including the family-specific ones, with messages that say what is allowed."""
        self.check()
        if family == "sd3" and self.true_cfg_scale not in (None, 1.0):
            raise ValueError(
                f"true_cfg_scale={self.true_cfg_scale} applies to FLUX only; SD3's CFG scale is guidance_scale."
            )
        if family == "flux" and self.true_cfg_scale not in (None, 1.0) and self.negative_prompt is None:
            raise ValueError(
                f"true_cfg_scale={self.true_cfg_scale} needs a negative prompt: FLUX's true CFG runs only with one "
                '(diffusers would silently skip it). Give a negative prompt (an empty one, "", means the empty '
                "prompt), or leave true_cfg_scale at 1."
            )

    def call_kwargs(self, family: str, image=None) -> dict[str, Any]:
        """Keyword arguments for a head-PAG pipeline call."""
        self.validate(family)
        kwargs: dict[str, Any] = {
            "prompt": self.prompt,
            "pag_heads": self.pag_heads,
            **{name: getattr(self, name) for name in PAG_FIELDS if getattr(self, name) is not None},
            "num_images_per_prompt": self.num_images,
            "generator": [torch.Generator().manual_seed(self.seed + i) for i in range(self.num_images)],
        }
        optional = {
            "negative_prompt": self.negative_prompt,
            "guidance_scale": self.guidance_scale,
            "num_inference_steps": self.num_inference_steps,
            "height": self.height,
            "width": self.width,
            "max_sequence_length": self.max_sequence_length,
        }
        if family == "flux":
            optional["true_cfg_scale"] = self.true_cfg_scale
        if image is not None:
            kwargs["image"] = image
            optional["strength"] = self.strength
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        kwargs.update(self.extra)
        return kwargs

    def with_model_defaults(self, pipe) -> GenerationSettings:
        """These settings with every `pag_*` value left at `None` spelled out as the call will use it (the model's
        recommendation, else the built-in default; the default heads when PAG is on), so the metadata says what ran.
        Changes and returns `self`."""
        block = open_block(pipe)  # an enclosing `with head_pag(pipe, ...)` beats the model's recommendations
        given = {k: v for k, v in (block.arguments if block is not None else {}).items() if v is not None}
        model = {**recommended(pipe), **given}
        defaults = over_builtin(model)
        for name in PAG_FIELDS:
            if getattr(self, name) is None:
                value = defaults[name]
                setattr(self, name, tuple(value) if name == "pag_interval" else value)
        if self.pag_heads is None and self.pag_scale > 0:
            heads = model.get("pag_heads")
            if heads is None:
                layout = transformer_layout(pipe)
                heads = default_pag_heads(layout.family, layout.num_layers)
            self.pag_heads = str(heads)
        return self

    def without_pag(self) -> GenerationSettings:
        """The same settings with PAG off (same seed), for side-by-side comparisons."""
        return GenerationSettings(**{**self.to_dict(), "pag_scale": 0.0})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> str:
        """JSON stored in PNG metadata and reports."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "extra"}, sort_keys=True)
