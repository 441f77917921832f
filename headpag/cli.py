"""The `headpag` command line: `generate`, `hunt` (HeadHunter search), `eval` (comparison reports), `ui` (web UI)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from diffusers.utils import logging


logger = logging.get_logger(__name__)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="Hub id, local diffusers folder, or an offline random-weight model: tiny-sd3, tiny-sd35, tiny-flux.",
    )
    p.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=None,
        help="Weights dtype (default: bfloat16 on CUDA, float32 on CPU).",
    )
    p.add_argument("--device", default=None, help="Device, e.g. cuda, cuda:1, cpu (default: cuda when available).")


def _add_pag_args(p: argparse.ArgumentParser) -> None:
    heads = p.add_mutually_exclusive_group()
    heads.add_argument("--pag-heads", default=None, help="Head spec, e.g. '11.15, 7, 3.0-5' (default: pipeline's).")
    heads.add_argument("--pag-heads-file", default=None, help="Head-set JSON file (e.g. from `headpag hunt`).")
    p.add_argument("--pag-scale", type=float, default=None, help="PAG scale s (default 3.0, or the file's).")
    p.add_argument("--pag-identity-weight", type=float, default=None, help="SoftPAG u in [0, 1] (default 1.0).")
    p.add_argument("--pag-identity-scope", choices=["joint", "image"], default="joint")
    p.add_argument("--pag-target", choices=["identity", "uniform", "query_mean"], default="identity")
    p.add_argument("--pag-interval", type=float, nargs=2, metavar=("START", "STOP"), default=(0.0, 1.0))
    p.add_argument("--pag-adaptive-scale", type=float, default=0.0)
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="SD3: CFG scale (off when <= 1). FLUX: the distilled guidance embedding (default 3.5).",
    )
    p.add_argument(
        "--true-cfg-scale", type=float, default=None, help="FLUX only: true CFG scale, used with --negative-prompt."
    )
    p.add_argument("--steps", type=int, default=None, help="Denoising steps (default: the pipeline's).")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headpag", description="Head-level perturbed-attention guidance.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="Generate images with head-level PAG.")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    _add_pag_args(gen)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--output", default="outputs/headpag.png", help="PNG path (several images: name-0.png, ...).")
    gen.add_argument("--image", default=None, help="Input image: selects the img2img pipeline.")
    gen.add_argument("--strength", type=float, default=0.6, help="img2img strength.")
    gen.add_argument("--compare", action="store_true", help="Also write the same seed without PAG beside it.")
    gen.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")

    from .search.cli import add_hunt_parser

    add_hunt_parser(sub, _add_model_args, _add_pag_args)
    from .eval.cli import add_eval_parser

    add_eval_parser(sub)
    from .app.cli import add_ui_parser

    add_ui_parser(sub)
    return parser


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[str, str]:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, dtype


def heads_and_defaults(args: argparse.Namespace):
    """(head spec, pag scale, identity weight): explicit flags first, then the head-set file's metadata."""
    from .guidance import HeadSet

    spec, scale, u = args.pag_heads, args.pag_scale, args.pag_identity_weight
    if args.pag_heads_file:
        hs = HeadSet.load(args.pag_heads_file)
        spec = str(hs)
        scale = scale if scale is not None else hs.metadata.get("recommended_scale")
        u = u if u is not None else hs.metadata.get("identity_weight")
    return spec, 3.0 if scale is None else scale, 1.0 if u is None else u


def settings_from_args(args: argparse.Namespace, **fields):
    """
    [`GenerationSettings`] from the generation flags (`--pag-*`, `--guidance-scale`, `--steps`, ...,
    `--negative-prompt`) shared by `generate` and `eval --config`; `fields` add or override values.
    """
    from .pipelines.settings import GenerationSettings

    spec, scale, u = heads_and_defaults(args)
    values = dict(
        negative_prompt=args.negative_prompt,
        pag_heads=spec,
        pag_scale=scale,
        pag_identity_weight=u,
        pag_identity_scope=args.pag_identity_scope,
        pag_target=args.pag_target,
        pag_interval=tuple(args.pag_interval),
        pag_adaptive_scale=args.pag_adaptive_scale,
        guidance_scale=args.guidance_scale,
        true_cfg_scale=args.true_cfg_scale,
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
    )
    return GenerationSettings(**{**values, **fields})


def output_paths(output: str, count: int, suffix: str = "") -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path / "headpag.png"
    if count == 1:
        return [path.with_name(f"{path.stem}{suffix}.png")]
    return [path.with_name(f"{path.stem}{suffix}-{i}.png") for i in range(count)]


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from ._io import save_png
    from .pipelines import load_pipeline
    from .runtime import describe_transformer

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    spec, scale, u = heads_and_defaults(args)
    settings = settings_from_args(
        args,
        prompt=args.prompt,
        seed=args.seed,
        num_images=args.num_images,
        strength=args.strength if args.image else None,
    )
    image = Image.open(args.image).convert("RGB") if args.image else None
    pipe = load_pipeline(args.model, img2img=image is not None, torch_dtype=dtype, device=device)
    family = describe_transformer(pipe.transformer).family
    settings.validate(family)
    pipe.set_progress_bar_config(disable=args.no_progress)
    runs = [("", settings)] + ([("-nopag", settings.without_pag())] if args.compare else [])
    for suffix, run in runs:
        images = pipe(**run.call_kwargs(family, image=image)).images
        for i, (img, path) in enumerate(zip(images, output_paths(args.output, len(images), suffix))):
            meta = {"headpag": run.to_json(), "model": args.model, "image_index": str(i)}
            save_png(img, path, meta)
            print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "hunt":
            from .search.cli import cmd_hunt

            return cmd_hunt(args)
        if args.command == "ui":
            from .app.cli import cmd_ui

            return cmd_ui(args)
        if args.command == "eval":
            from .eval.cli import cmd_eval

            return cmd_eval(args)
    except ValueError as e:
        print(f"headpag {args.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
