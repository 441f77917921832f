"""
Settings shared by every client (the `headpag` commands and the web UI): generation flags, seeds, prompts, devices
and the limits on what one request may cost. Clients import this module; nothing below it does.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .guidance import HeadSet
from .guidance.presets import load_preset
from .pipelines.settings import GenerationSettings


DTYPES = ("float16", "bfloat16", "float32")


# ---------------------------------------------------------------------------------------------------------- limits
@dataclass
class Limits:
    r"""
    What one request may cost, in one place. Every client checks a request against these before any work; the web
    UI takes each from a start-up flag (`--max-size` for `max_size`, ...).

    Args:
        max_size (`int`): Largest height or width in pixels.
        max_steps (`int`): Most denoising steps.
        max_images (`int`): Most images per generation call.
        max_prompt_chars (`int`): Longest prompt (and negative prompt).
        max_scale (`float`): Largest guidance, true-CFG, PAG and adaptive scale.
        max_seeds (`int`): Most seeds in one list.
        max_prompts (`int`): Most prompts in one search or evaluation.
        max_pairs (`int`): Most prompt-seed pairs in one search.
        max_pool (`int`): Most candidate heads in one search.
        max_rounds (`int`): Most search rounds.
        max_queue_per_client (`int`): Requests one client may have waiting or running.
        max_queue (`int`): Requests waiting or running in total.
        max_upload_mb (`float`): Largest uploaded file.
        max_uploads_mb_per_client (`float`): Most upload bytes one client may send per hour.
        max_output_mb_per_client (`float`): Most disk one client's generated and saved files may take.
        max_output_mb (`float`): Most disk the output folder may take.
        max_output_age_h (`float`): Files of the output folder older than this are removed.
        max_output_files (`int`): Most files in the output folder (the oldest beyond it are removed).
        max_search_image_steps (`int`): Most denoising steps one search may render (its projected images x steps).
        max_search_hours (`float`): A search still running after this long stops before its next batch.
        search_grace_min (`float`): A search nobody follows (its client left) for this long is cancelled.
    """

    max_size: int = 2048
    max_steps: int = 200
    max_images: int = 8
    max_prompt_chars: int = 2000
    max_scale: float = 100.0
    max_seeds: int = 1000
    max_prompts: int = 1000
    max_pairs: int = 1000
    max_pool: int = 57 * 24
    max_rounds: int = 64
    max_queue_per_client: int = 2
    max_queue: int = 16
    max_upload_mb: float = 20.0
    max_uploads_mb_per_client: float = 200.0
    max_output_mb_per_client: float = 500.0
    max_output_mb: float = 5000.0
    max_output_age_h: float = 24.0
    max_output_files: int = 10000
    max_search_image_steps: int = 2_000_000
    max_search_hours: float = 24.0
    search_grace_min: float = 10.0

    @staticmethod
    def flag(name: str) -> str:
        """The start-up flag that sets limit `name`."""
        return "--" + name.replace("_", "-")

    @staticmethod
    def commands(name: str) -> str:
        """The `headpag` commands that take limit `name` as a flag."""
        if name in GENERATION_LIMITS:
            return "generate/hunt/eval/ui"
        return "hunt/ui" if name in WORK_LIMITS else "ui"

    def refuse(self, what: str, value: Any, name: str) -> None:
        raise ValueError(
            f"{what} {value} is over the limit {name}={getattr(self, name)}; it is raised with {self.flag(name)} "
            f"(`headpag {self.commands(name)} {self.flag(name)} N`; on a web UI, by "
            "the server's operator)."
        )

    def check_count(self, what: str, value: int, name: str) -> None:
        if value > getattr(self, name):
            self.refuse(what, value, name)

    def check_search_budget(self, images: int, image_steps: int) -> None:
        """Refuse a search whose projected denoising steps (images x their steps) pass `max_search_image_steps`."""
        if image_steps > self.max_search_image_steps:
            raise ValueError(
                f"This search would render up to {images} images, {image_steps} denoising steps in all, over the "
                f"limit max_search_image_steps={self.max_search_image_steps}; use fewer prompt-seed pairs, rounds, "
                f"candidate heads or steps, the halving strategy, or raise it with "
                f"{self.flag('max_search_image_steps')}."
            )

    def check_settings(self, settings: GenerationSettings) -> None:
        """Refuse a generation over a limit, before any work, naming the limit and its flag."""
        for what, value in (("height", settings.height), ("width", settings.width)):
            if value is not None and value > self.max_size:
                self.refuse(what, value, "max_size")
        if settings.num_inference_steps is not None and settings.num_inference_steps > self.max_steps:
            self.refuse("num_inference_steps", settings.num_inference_steps, "max_steps")
        self.check_count("num_images", settings.num_images, "max_images")
        for what, text in (("prompt length", settings.prompt), ("negative prompt length", settings.negative_prompt)):
            if text is not None and len(text) > self.max_prompt_chars:
                self.refuse(what, len(text), "max_prompt_chars")
        for name in ("guidance_scale", "true_cfg_scale", "pag_scale", "pag_adaptive_scale"):
            value = getattr(settings, name)
            if value is not None and abs(value) > self.max_scale:
                self.refuse(name, value, "max_scale")

    def add_arguments(self, parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
        """One flag per limit (`names`, default all: the server's; the commands take the work limits)."""
        group = parser.add_argument_group("limits (each request is refused before any work when over one)")
        for f in fields(self):
            if names is None or f.name in names:
                kind = float if isinstance(getattr(self, f.name), float) else int
                group.add_argument(self.flag(f.name), type=positive(kind), default=getattr(self, f.name))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Limits:
        """The limits a command was given (defaults for the flags it does not have)."""
        defaults = cls()
        return cls(**{f.name: getattr(args, f.name, getattr(defaults, f.name)) for f in fields(cls)})


# The limits of the work itself, which the commands take as flags too (`generate` and `eval` the generation limits,
# `hunt` also the search limits); the others bound what a server accepts from its clients.
GENERATION_LIMITS = (
    "max_size",
    "max_steps",
    "max_images",
    "max_prompt_chars",
    "max_scale",
    "max_seeds",
    "max_prompts",
)
WORK_LIMITS = (*GENERATION_LIMITS, "max_pairs", "max_pool", "max_rounds", "max_search_image_steps")


# ----------------------------------------------------------------------------------------------------- arg types
def finite_float(text: str) -> float:
    """argparse type: a finite number (refuses `nan`, `inf`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive(kind=int):
    """argparse type factory: a finite number > 0 of `kind`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


# ------------------------------------------------------------------------------------------------------- flags
def add_model_args(parser: argparse.ArgumentParser, required: bool = True, default: str | None = None) -> None:
    parser.add_argument(
        "--model",
        required=required,
        default=default,
        help="Hub id, local diffusers folder, or an offline model: headpag-shapes (trained shapes testbed, the "
        "default of `headpag ui`), headpag-shapes-flux (its FLUX sibling), tiny-sd3, tiny-sd35, tiny-flux (random "
        "weights).",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="Weights dtype (default: bfloat16 on CUDA, float32 on CPU)."
    )
    parser.add_argument(
        "--device", default=None, help="Device, e.g. cuda, cuda:1, cpu (default: cuda when available)."
    )


def add_pag_args(parser: argparse.ArgumentParser) -> None:
    """The generation flags that shape an image (shared by `generate` and `eval --config`)."""
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument(
        "--pag-heads", default=None, help="Head spec, e.g. '11.15, 7, 3.0-5' (default: the model's default heads)."
    )
    heads.add_argument("--pag-heads-file", default=None, help="Head-set JSON file (e.g. from `headpag hunt`).")
    heads.add_argument(
        "--pag-heads-preset", default=None, help="A ready-made head set by name (`headpag presets` lists them)."
    )
    # every pag_* default: the head-set file's, else the model's recommendation (headpag_config.json), else built-in
    model = "the model's recommendation, else"
    parser.add_argument(
        "--pag-scale", type=finite_float, default=None, help=f"PAG scale s (default: the file's, {model} 3.0)."
    )
    parser.add_argument(
        "--pag-identity-weight", type=finite_float, default=None, help=f"SoftPAG u in [0, 1] (default: {model} 1)."
    )
    parser.add_argument(
        "--pag-identity-scope", choices=["joint", "image"], default=None, help=f"(default: {model} joint)"
    )
    parser.add_argument(
        "--pag-target",
        choices=["identity", "uniform", "query_mean"],
        default=None,
        help=f"(default: {model} identity)",
    )
    parser.add_argument(
        "--pag-interval",
        type=finite_float,
        nargs=2,
        metavar=("START", "STOP"),
        default=None,
        help=f"Fractions of the steps with PAG (default: {model} 0 1).",
    )
    parser.add_argument("--pag-adaptive-scale", type=finite_float, default=None, help=f"(default: {model} 0)")
    parser.add_argument(
        "--pag-reuse",
        type=positive(int),
        default=None,
        help=f"The perturbed branch every k steps of the interval, v_c - v_p reused in between (default: {model} 1).",
    )
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=None,
        help="SD3: CFG scale (off when <= 1). FLUX: the distilled guidance embedding (default 3.5).",
    )
    parser.add_argument(
        "--true-cfg-scale",
        type=finite_float,
        default=None,
        help="FLUX only: true CFG scale, used with --negative-prompt.",
    )
    advice = "the pipeline's; in generate, the model's sampler advice (headpag_config.json) first"
    parser.add_argument("--steps", type=positive(int), default=None, help=f"Denoising steps (default: {advice}).")
    parser.add_argument("--height", type=positive(int), default=None, help=f"(default: {advice})")
    parser.add_argument("--width", type=positive(int), default=None, help=f"(default: {advice})")
    parser.add_argument(
        "--max-sequence-length",
        type=positive(int),
        default=None,
        help="T5 tokens per prompt (pipeline default 256; at most 512). Fewer is faster.",
    )


# ------------------------------------------------------------------------------------------------------- values
def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[str, str]:
    """`(device, dtype)` with defaults (CUDA when available, bfloat16 there, float32 on CPU); a CUDA device on a
    machine without CUDA is refused with a clear error."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}.")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, dtype


def heads_and_defaults(args: argparse.Namespace) -> tuple[str | None, float | None, float | None]:
    """(head spec, pag scale, identity weight): explicit flags first, then the head-set file's or preset's metadata;
    `None` where neither says (the model's recommendation applies, see `GenerationSettings.with_model_defaults`)."""
    spec, scale, u = args.pag_heads, args.pag_scale, args.pag_identity_weight
    if spec is not None and not spec.strip():
        spec = None  # an empty head field means the model's default heads, everywhere
    preset = getattr(args, "pag_heads_preset", None)
    if args.pag_heads_file or preset:
        hs = HeadSet.load(args.pag_heads_file) if args.pag_heads_file else load_preset(preset)
        if not hs:
            where = f"--pag-heads-file {args.pag_heads_file}" if args.pag_heads_file else f"preset {preset!r}"
            raise ValueError(f"{where} holds no heads; give a head set with at least one head.")
        spec = str(hs)
        scale = scale if scale is not None else hs.metadata.get("recommended_scale")
        u = u if u is not None else hs.metadata.get("identity_weight")
    return spec, scale, u


def check_preset_fits(args: argparse.Namespace, layout) -> None:
    """Refuse a `--pag-heads-preset` or a `--pag-heads-file` made on another model family or shape than the loaded
    model's (a file says so in its `model_family`, `num_layers`, `num_heads` metadata, when it has them)."""
    preset = getattr(args, "pag_heads_preset", None)
    if preset:
        load_preset(preset, num_layers=layout.num_layers, num_heads=layout.num_heads, family=layout.family)
    path = getattr(args, "pag_heads_file", None)
    if path:
        meta = HeadSet.load(path).metadata
        found = {"model_family": meta.get("model_family"), "num_layers": meta.get("num_layers")}
        found["num_heads"] = meta.get("num_heads")
        model = {"model_family": layout.family, "num_layers": layout.num_layers, "num_heads": layout.num_heads}
        wrong = [
            f"{key} {found[key]!r} (the model's: {model[key]!r})"
            for key in model
            if found[key] not in (None, model[key])
        ]
        if wrong:
            raise ValueError(
                f"--pag-heads-file {path} was made for another model: {', '.join(wrong)}. Use a head set found on "
                "this model (headpag hunt), or a spec with --pag-heads."
            )


def settings_from_args(args: argparse.Namespace, **values: Any) -> GenerationSettings:
    """
    [`GenerationSettings`] from the generation flags (`--pag-*`, `--guidance-scale`, `--steps`, ...,
    `--negative-prompt`) shared by `generate` and `eval --config`; `values` add or override fields.
    """
    spec, scale, u = heads_and_defaults(args)
    flags = dict(
        negative_prompt=getattr(args, "negative_prompt", None),
        pag_heads=spec,
        pag_scale=scale,
        pag_identity_weight=u,
        pag_identity_scope=args.pag_identity_scope,
        pag_target=args.pag_target,
        pag_interval=None if args.pag_interval is None else tuple(args.pag_interval),
        pag_adaptive_scale=args.pag_adaptive_scale,
        pag_reuse=args.pag_reuse,
        guidance_scale=args.guidance_scale,
        true_cfg_scale=args.true_cfg_scale,
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
        max_sequence_length=getattr(args, "max_sequence_length", None),
    )
    return GenerationSettings(**{**flags, **values})


SEEDS_PATTERN = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_seeds(text: str, limit: int | None = None) -> list[int]:
    """
    `"0-4"` -> [0, 1, 2, 3, 4]; `"0,3,7"` -> [0, 3, 7]. The count is checked against `limit` before any range is
    expanded, so the cost is proportional to the text.
    """
    parts = [p for p in str(text).split(",") if p.strip()]
    spans = []
    for part in parts:
        match = SEEDS_PATTERN.match(part)
        if not match:
            raise ValueError(f"Invalid seeds {text!r}: use non-negative integers like '0-4' or '0,3,7'.")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo or hi >= 2**63:
            raise ValueError(
                f"Invalid seed range {part.strip()!r} in {text!r}: use LOW-HIGH with LOW <= HIGH < 2**63."
            )
        spans.append((lo, hi))
    if not spans:
        raise ValueError(f"No seeds in {text!r}: use '0-4' or '0,3,7'.")
    count = sum(hi - lo + 1 for lo, hi in spans)
    if limit is not None and count > limit:
        raise ValueError(f"{count} seeds in {text!r} is over the limit max_seeds={limit}.")
    return [seed for lo, hi in spans for seed in range(lo, hi + 1)]


PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".md")


def read_prompts(value: str, limit: int | None = None) -> list[str]:
    """
    A prompt file (one per line, `#` comments) or one literal prompt. A value that names a file which does not
    exist (it has a path separator or a file suffix such as `.txt`) is an error, never a prompt.
    """
    path = Path(value)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"Cannot read prompt file {value}: {type(error).__name__}.") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise ValueError(f"Prompt file {value} has no prompts (one per line; '#' starts a comment).")
    elif path.is_dir():
        raise ValueError(f"Prompt file {value} is a folder; pass a text file with one prompt per line.")
    elif "/" in value or "\\" in value or path.suffix.lower() in PROMPT_FILE_SUFFIXES:
        raise ValueError(
            f"Prompt file not found: {value}. Pass an existing file (one prompt per line) or the prompt text itself."
        )
    else:
        prompts = [value]
    if limit is not None and len(prompts) > limit:
        raise ValueError(f"{len(prompts)} prompts is over the limit max_prompts={limit}.")
    return prompts
