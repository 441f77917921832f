"""`headpag generate`: images with head-level PAG (and, with `--compare`, the same seed without it)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from .. import options
from .._io import atomic_write_bytes, save_png


IMAGE_TYPES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_output_type(path: str | Path) -> str:
    """The image format of an output path from its suffix (PNG, JPEG, WEBP); anything else is refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_TYPES:
        raise ValueError(
            f"Output {path}: unknown image type {suffix or '(no suffix)'!r}; use one of "
            f"{', '.join(IMAGE_TYPES)} (or a folder name without a suffix)."
        )
    return IMAGE_TYPES[suffix]


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="Generate images with head-level PAG.")
    options.add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    options.add_pag_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=options.positive(int), default=1)
    p.add_argument(
        "--output",
        default="outputs/headpag.png",
        help="Image path (.png, .jpg, .webp; several images: name-0.png, ...) or a folder (then headpag.png).",
    )
    p.add_argument("--image", default=None, help="Input image: selects the img2img pipeline.")
    p.add_argument("--strength", type=options.finite_float, default=0.6, help="img2img strength in (0, 1].")
    p.add_argument("--compare", action="store_true", help="Also write the same seed without PAG beside it.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    options.Limits().add_arguments(p, options.GENERATION_LIMITS)


def output_paths(output: str, count: int, suffix: str = "") -> list[Path]:
    """The files `generate` writes: `output` itself (an image path) or `output/headpag.png` (a folder)."""
    path = Path(output)
    if not path.suffix:
        path = path / "headpag.png"
    image_output_type(path)
    if count == 1:
        return [path.with_name(f"{path.stem}{suffix}{path.suffix}")]
    return [path.with_name(f"{path.stem}{suffix}-{i}{path.suffix}") for i in range(count)]


def check_writable(folder: Path) -> None:
    """Refuse, before any generation, an output folder that cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".headpag-write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"Output folder {folder} is not writable: {error.strerror or error}.") from None


def read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Input image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Input image {path} is not an image PIL can read ({type(error).__name__}).") from None


def save_image(image, path: Path, metadata: dict[str, str]) -> None:
    """PNG with the settings as text chunks; JPEG / WEBP written atomically (they carry no settings)."""
    fmt = image_output_type(path)
    if fmt == "PNG":
        save_png(image, path, metadata)
        return
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    atomic_write_bytes(path, buffer.getvalue())


def run(args: argparse.Namespace) -> int:
    from ..models import load_pipeline, model_defaults
    from ..runtime import describe_transformer

    if not 0 < args.strength <= 1:
        raise ValueError(f"--strength {args.strength}: must be in (0, 1].")
    device, dtype = options.resolve_device_dtype(args.device, args.dtype)
    sampler = model_defaults(args.model)  # the model's sampler advice, for the flags left out
    advice = (("steps", "steps"), ("guidance_scale", "guidance"), ("true_cfg_scale", "true_cfg"), ("height", "size"),
              ("width", "size"))  # fmt: skip
    for flag, key in advice:
        if getattr(args, flag) is None and key in sampler:
            setattr(args, flag, sampler[key])
            if key == "true_cfg" and args.negative_prompt is None:
                args.negative_prompt = ""  # FLUX's true CFG against the empty prompt, as the model was trained
    settings = options.settings_from_args(
        args,
        prompt=args.prompt,
        seed=args.seed,
        num_images=args.num_images,
        strength=args.strength if args.image else None,
    )
    settings.check()
    limits = options.Limits.from_args(args)
    limits.check_settings(settings)
    suffixes = [""] + (["-nopag"] if args.compare else [])
    paths = {suffix: output_paths(args.output, args.num_images, suffix) for suffix in suffixes}
    check_writable(paths[""][0].parent)
    image = read_image(args.image) if args.image else None
    pipe = load_pipeline(args.model, img2img=image is not None, torch_dtype=dtype, device=device)
    layout = describe_transformer(pipe.transformer)
    family = layout.family
    options.check_preset_fits(args, layout)
    settings.validate(family)
    settings.with_model_defaults(pipe)  # spelled out: the metadata says what ran, and the limits see it
    limits.check_settings(settings)
    runs = [("", settings)] + ([("-nopag", settings.without_pag())] if args.compare else [])
    pipe.set_progress_bar_config(disable=args.no_progress)
    for suffix, run_settings in runs:
        images = pipe(**run_settings.call_kwargs(family, image=image)).images
        for i, (img, path) in enumerate(zip(images, paths[suffix])):
            save_image(img, path, {"headpag": run_settings.to_json(), "model": args.model, "image_index": str(i)})
            print(f"wrote {path}")
    return 0
