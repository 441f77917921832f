"""
`HeadPAGMixin`: the head-PAG pipeline classes are thin sugar over [`head_pag`].

A subclass's `__call__` is its diffusers parent's call inside `with head_pag(self, ...)`; its signature is the
parent's plus the `pag_*` arguments and its docstring the parent's, extended. Inside an enclosing
`with head_pag(pipe, ...)` block, the call's explicit `pag_*` arguments beat the block's, which beat the class
defaults (`set_pag_heads`, `set_pag_sequential`, `set_pag_defaults`: the model's recommendations); `pag_scale=0` is
always exactly the parent pipeline.
`save_pretrained` writes a folder that stock `DiffusionPipeline.from_pretrained` loads (as the parent pipeline),
with the head-PAG defaults in `headpag_config.json` (see [`~pipelines.model_config`]), which our classes read back;
`from_pipe` keeps them.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline
from diffusers.utils import logging

from .._io import atomic_write_json
from ..guidance import HeadSet
from ..guidance.heads import HeadSetLike
from .attach import default_pag_heads, head_pag, open_block, transformer_layout, warn_outside_context
from .model_config import CONFIG_FILE, check_pag_defaults, folder_config, over_builtin, read_headpag_config


logger = logging.get_logger(__name__)

PAG_PARAMETERS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
    for name, default, annotation in (
        ("pag_heads", None, "HeadSet | str | list | None"),
        ("pag_scale", None, "float | None"),
        ("pag_identity_weight", None, "float | None"),
        ("pag_identity_scope", None, "str | None"),
        ("pag_target", None, "str | None"),
        ("pag_interval", None, "tuple[float, float] | None"),
        ("pag_adaptive_scale", None, "float | None"),
        ("pag_sequential", None, "bool | None"),
        ("pag_share_prefix", None, "bool | None"),
        ("pag_reuse", None, "int | None"),
    )
]
PAG_NAMES = [p.name for p in PAG_PARAMETERS]

PAG_DOCS = """
        Head-level PAG arguments (headpag): `v = v_u + g (v_c - v_u) + s (v_c - v_p)` plus any other guidance term
        of this pipeline, each term with its own meaning. An argument left at `None` takes the model's
        recommendation (`pipe.pag_defaults`, from the folder's `headpag_config.json`), else the default named here.

            pag_heads (`HeadSet`, `str`, list of `(layer, head)` pairs or layer ints, *optional*):
                Heads to perturb, e.g. `"11.15, 7"`. `None` uses the pipeline's default (`set_pag_heads`). A list of
                `HeadSet` objects gives every generated image its own head set (one per prompt x image).
            pag_scale (`float`, defaults to 3.0):
                PAG scale `s`. `0` gives exactly the parent pipeline's output and runs no perturbed pass.
            pag_identity_weight (`float`, defaults to 1.0):
                SoftPAG's `u` in `[0, 1]`: `A <- (1 - u) A + u I`. 1 is PAG; 0.25-0.5 avoids over-smoothing.
            pag_identity_scope (`str`, defaults to `"joint"`):
                `"joint"` (the paper's identity over image and text tokens) or `"image"` (diffusers-compatible).
            pag_target (`str`, defaults to `"identity"`): `"identity"`, `"uniform"` or `"query_mean"`.
            pag_interval (`tuple[float, float]`, defaults to `(0.0, 1.0)`):
                Fractions of the denoising steps where PAG is applied; outside, no perturbed pass runs.
            pag_adaptive_scale (`float`, defaults to 0.0):
                diffusers' adaptive schedule `s - a (1000 - t)`, clamped at 0; at 0 no perturbed pass runs.
            pag_sequential (`bool`, *optional*):
                Run the perturbed rows as a separate transformer call (lower peak memory). Defaults to the
                pipeline setting (`set_pag_sequential`, `False`).
            pag_share_prefix (`bool`, defaults to `True`):
                Compute the blocks before the first perturbed layer once for the conditional and perturbed rows.
            pag_reuse (`int`, defaults to 1):
                Run the perturbed branch on steps 0, k, 2k, ... of the interval only; the steps in between reuse the
                last computed `v_c - v_p` times their own scale. 1 is PAG on every step.
"""


FINITE_ARGUMENTS = (
    "guidance_scale",
    "true_cfg_scale",
    "strength",
    "skip_layer_guidance_scale",
    "controlnet_conditioning_scale",
)


def check_finite(kwargs: dict[str, Any]) -> None:
    """Refuse non-finite guidance numbers before any work (diffusers would run and return a black image)."""
    for name in FINITE_ARGUMENTS:
        value = kwargs.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")


def _diffusers_parent(cls: type) -> type:
    """The first diffusers pipeline class in `cls`'s MRO that is not one of ours."""
    for base in cls.__mro__[1:]:
        if issubclass(base, DiffusionPipeline) and not issubclass(base, HeadPAGMixin):
            return base
    raise TypeError(f"{cls.__name__} must subclass a diffusers pipeline.")


class HeadPAGMixin:
    r"""
    Adds head-level perturbed-attention guidance to a diffusers SD3 or FLUX pipeline (mix it in first).

    Extra call arguments (keyword only): `pag_heads`, `pag_scale`, `pag_identity_weight`, `pag_identity_scope`,
    `pag_target`, `pag_interval`, `pag_adaptive_scale`, `pag_sequential`, `pag_share_prefix`, `pag_reuse`; see
    [`head_pag`].
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not issubclass(cls, DiffusionPipeline) or "__call__" in cls.__dict__:
            return
        parent = _diffusers_parent(cls)
        parent_call = parent.__call__

        def __call__(self, *args, **kwargs):
            pag = {name: kwargs.pop(name) for name in PAG_NAMES if name in kwargs}
            check_finite(kwargs)
            outer = open_block(
                self
            )  # explicit call arguments beat an enclosing block, which beats the model's defaults
            if outer is not None:  # a `None` in the call is no argument: the block's value stands
                pag = {**outer.arguments, **{k: v for k, v in pag.items() if v is not None}}
            else:
                warn_outside_context(self, "uses the model's defaults, not the block's PAG arguments")
            with head_pag(self, **pag):
                return parent_call(self, *args, **kwargs)

        signature = inspect.signature(parent_call)
        params = list(signature.parameters.values())
        tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
        __call__.__signature__ = signature.replace(parameters=[*params, *PAG_PARAMETERS, *tail])
        __call__.__doc__ = (parent_call.__doc__ or "") + PAG_DOCS
        __call__.__name__ = "__call__"
        __call__.__qualname__ = f"{cls.__name__}.__call__"
        __call__.__module__ = cls.__module__
        cls.__call__ = __call__

    def _init_head_pag(self, pag_heads: HeadSetLike, pag_sequential: bool) -> None:
        self._pag_heads: HeadSet | None = None
        self._pag_sequential = bool(pag_sequential)
        self._headpag_extra: dict[str, Any] = {}  # other sections of headpag_config.json (a model's sampler advice)
        if pag_heads is not None and getattr(self, "transformer", None) is not None:
            self.set_pag_heads(pag_heads)
        elif pag_heads is not None:
            self._pag_heads = HeadSet.coerce(pag_heads)

    # ------------------------------------------------------------------ configuration
    @property
    def pag_heads(self) -> HeadSet:
        """The default head set of this pipeline (used when a call passes `pag_heads=None`)."""
        if self._pag_heads is not None:
            return self._pag_heads
        layout = transformer_layout(self)
        return default_pag_heads(layout.family, layout.num_layers)

    def set_pag_heads(self, pag_heads: HeadSetLike) -> None:
        """
        Set the default head set, checked against the model.

        Args:
            pag_heads (`HeadSet`, `str`, or list of pairs / layer ints): e.g. `"11.15, 7"`; `None` restores the
                built-in default (see docs/scripting.md).
        """
        if pag_heads is None:
            self._pag_heads = None
            return
        heads = HeadSet.coerce(pag_heads)
        layout = transformer_layout(self)
        heads.resolve(layout.num_layers, layout.num_heads)
        self._pag_heads = heads

    def set_pag_sequential(self, sequential: bool) -> None:
        """Run the perturbed branch as its own transformer call (lower peak memory) by default."""
        self._pag_sequential = bool(sequential)

    @property
    def pag_defaults(self) -> dict[str, Any]:
        """The `pag_*` values a call uses when it does not give them: the model's recommendations (the `pag` section
        of `headpag_config.json`, or `set_pag_defaults`) over the built-in defaults."""
        return over_builtin(self._headpag_extra.get("pag", {}))

    def set_pag_defaults(self, **values: Any) -> None:
        """
        Set recommended `pag_*` defaults (saved by `save_pretrained`), e.g. `set_pag_defaults(pag_scale=2.0)`; the
        values given replace the whole section (the others fall back to the built-in defaults); the heads and the
        sequential mode have their own setters. `set_pag_defaults()` restores the built-in ones.

        Raises:
            `ValueError`: for an unknown name or a bad value (naming it and what is allowed).
        """
        values = check_pag_defaults(values, where="set_pag_defaults")
        if values:
            self._headpag_extra["pag"] = values
        else:
            self._headpag_extra.pop("pag", None)

    # ------------------------------------------------------------------ save / load
    def _head_pag_config(self) -> dict[str, Any]:
        return {
            "pag_heads": None if self._pag_heads is None else str(self._pag_heads),
            "pag_sequential": self._pag_sequential,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """
        diffusers' `save_pretrained`, with `_class_name` naming the diffusers parent (so that stock
        `DiffusionPipeline.from_pretrained` loads the folder) and the head-PAG defaults in `headpag_config.json`.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = _diffusers_parent(type(self)).__name__
        atomic_write_json(folder / "model_index.json", index)
        config = {"class": type(self).__name__, **self._head_pag_config(), **getattr(self, "_headpag_extra", {})}
        atomic_write_json(folder / CONFIG_FILE, config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`; restores the head-PAG defaults saved by `save_pretrained` unless given."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe._restore(read_headpag_config(pretrained_model_name_or_path), kwargs)
        return pipe

    def _restore(self, saved: dict[str, Any], kwargs: dict[str, Any]) -> None:
        """Take a folder's `headpag_config.json` (`saved`) as this pipeline's defaults, except what `kwargs` give."""
        if saved.get("pag_heads") is not None and "pag_heads" not in kwargs:
            self.set_pag_heads(saved["pag_heads"])
        if "pag_sequential" in saved and "pag_sequential" not in kwargs:
            self.set_pag_sequential(saved["pag_sequential"])
        self._headpag_extra = {k: v for k, v in saved.items() if k not in ("class", "pag_heads", "pag_sequential")}

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe`; keeps the head-PAG defaults of a head-PAG source pipeline, or takes those of the
        local folder a stock source pipeline was loaded from, unless given."""
        pipe = super().from_pipe(pipeline, **kwargs)
        if not isinstance(pipeline, HeadPAGMixin):  # a stock pipeline: the folder it was loaded from recommends
            pipe._restore(folder_config(pipeline), kwargs)
        else:
            if "pag_heads" not in kwargs and pipeline._pag_heads is not None:
                pipe.set_pag_heads(pipeline._pag_heads)
            if "pag_sequential" not in kwargs:
                pipe.set_pag_sequential(pipeline._pag_sequential)
            pipe._headpag_extra = dict(getattr(pipeline, "_headpag_extra", {}))
        return pipe
