"""`headpag eval`: compare named configurations (or score existing images) and write a report."""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from .. import options
from ..eval.generation import EvalConfig
from ..eval.registry import feature_names
from ..guidance import HeadSet
from ..pipelines.settings import GenerationSettings


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="Compare configurations (table, plots, grids) or score existing images.",
        description=(
            "Generate every prompt-seed pair under each --config NAME=OPTIONS (images cached under "
            "OUTPUT_DIR/images and reused), score them, and write report.md / report.json / plots / grids. "
            "With --images DIR, score existing images instead."
        ),
    )
    p.add_argument(
        "--model",
        default=None,
        help="Hub id, local folder, headpag-shapes / headpag-shapes-flux (trained, offline), or tiny-sd3 / "
        "tiny-sd35 / tiny-flux.",
    )
    p.add_argument("--dtype", choices=options.DTYPES, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--prompts", default=None, help="Prompt file (one per line) or a single prompt.")
    p.add_argument("--seeds", default="0", help="Seeds, e.g. 0-9 or 0,3,7 (every prompt with every seed).")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=OPTIONS",
        help="A configuration, e.g. 'cfg=--guidance-scale 5' or 'hh=--pag-heads-file heads.json "
        "--pag-identity-weight 0.5'. PAG is on only when OPTIONS name heads or --pag-scale. Repeatable.",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="Sweep a generation setting (e.g. pag_scale=1,2,3; pag_heads takes ';'-separated specs) or top_k (the "
        "K best heads of --search-run) on top of the first --config (or the defaults). Repeatable: every "
        "combination is a configuration; one or two swept settings get line plots / a heatmap.",
    )
    p.add_argument("--search-run", default=None, help="HeadHunter run folder for --sweep top_k=...")
    p.add_argument("--images", default=None, help="Score the images in DIR (or its sub-folders) without generating.")
    p.add_argument(
        "--metrics",
        default="clip",
        help="Comma-separated: clip, pickscore, aesthetic, hpsv2, imagereward, shapes-judge, shapes-correct (per "
        "image; the last two judge headpag-shapes images); fid, kid, prdc (precision/recall/density/coverage, on the "
        "--fid-features), cmmd (on CLIP features of --clip-model) against --reference-images.",
    )
    p.add_argument("--reference-images", default=None, help="Folder of reference images for FID/KID.")
    p.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name or config JSON (CLIP score).")
    p.add_argument("--clip-checkpoint", default=None, help="CLIP weights file (.safetensors or torch, weights only).")
    p.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag (downloads when reachable).")
    p.add_argument("--pickscore-model", default="yuvalkirstain/PickScore_v1", help="PickScore folder or hub id.")
    p.add_argument(
        "--aesthetic-head",
        default=None,
        help="LAION aesthetic predictor weights (sac+logos+ava1-l14-linearMSE.pth); its CLIP ViT-L-14 comes from "
        "--clip-checkpoint / --clip-pretrained openai.",
    )
    p.add_argument("--hps-checkpoint", default=None, help="HPSv2 weights (HPS_v2.1_compressed.pt from xswu/HPSv2).")
    p.add_argument("--imagereward-checkpoint", default=None, help="ImageReward.pt (hub THUDM/ImageReward).")
    p.add_argument(
        "--imagereward-tokenizer", default="bert-base-uncased", help="BERT tokenizer folder or hub id (ImageReward)."
    )
    p.add_argument("--pickscore-processor", default=None, help="Processor folder or hub id (default: see docs).")
    p.add_argument(
        "--inception-weights",
        default=None,
        help="FID Inception weights pt_inception-2015-12-05-6726825d.pth (or $HEADPAG_INCEPTION_WEIGHTS).",
    )
    p.add_argument(
        "--fid-features",
        choices=["inception", "clip", *feature_names()],
        default="inception",
        help="Features for FID/KID/PRDC: the standard FID Inception, the --clip-model image encoder, or the shapes "
        "testbed's judge (for headpag-shapes images).",
    )
    p.add_argument(
        "--cache-dir",
        default=str(Path.home() / ".cache" / "headpag" / "reference-features"),
        help="Cache of reference-image features, keyed by the folder's content and the feature model.",
    )
    p.add_argument("--kid-subsets", type=options.positive(int), default=100)
    p.add_argument(
        "--kid-subset-size",
        type=options.positive(int),
        default=None,
        help="Images per KID subset (default: min(1000, both sets); refused when larger than a set).",
    )
    p.add_argument(
        "--grid-cell",
        type=options.positive(int),
        default=256,
        help="Longest side of a grid tile in pixels (default 256; --grid-full-size keeps the images' size).",
    )
    p.add_argument("--grid-full-size", action="store_true", help="Grid tiles at the images' full size.")
    p.add_argument("--grid-rows", type=options.positive(int), default=8, help="Prompt-seed pairs per grid image.")
    p.add_argument("--output-dir", default="runs/eval")
    p.add_argument("--no-progress", action="store_true")
    options.Limits().add_arguments(p, options.GENERATION_LIMITS)


def build_metrics(args: argparse.Namespace, metrics: list[str], device: str | None):
    """(pair metrics by name, set-metric features or None, CMMD's CLIP features or None); every model loads once."""
    pair: dict = {}
    if "clip" in metrics:
        from ..eval.clip_score import ClipScore

        pair["clip"] = ClipScore(args.clip_model, args.clip_checkpoint, args.clip_pretrained, device=device)
    if "pickscore" in metrics:
        from ..eval.pickscore import PickScore

        pair["pickscore"] = PickScore(args.pickscore_model, args.pickscore_processor, device=device)
    if "aesthetic" in metrics:
        from ..eval.preference import AestheticScore

        pair["aesthetic"] = AestheticScore(
            args.aesthetic_head, args.clip_model, args.clip_checkpoint, args.clip_pretrained, device=device
        )
    if "hpsv2" in metrics:
        from ..eval.preference import HPSv2Score

        pair["hpsv2"] = HPSv2Score(args.hps_checkpoint, device=device)
    if "imagereward" in metrics:
        from ..eval.preference import ImageRewardScore

        pair["imagereward"] = ImageRewardScore(args.imagereward_checkpoint, args.imagereward_tokenizer, device=device)
    from ..eval.registry import load_features, load_pair_metric, pair_metric_names

    for name in pair_metric_names():
        if name in metrics:
            pair[name] = load_pair_metric(name, device=device)
    features = None
    cmmd_features = None
    if "cmmd" in metrics:
        from ..eval.features import ClipFeatures

        cmmd_features = ClipFeatures(args.clip_model, args.clip_checkpoint, args.clip_pretrained, device=device)
    if any(m in metrics for m in ("fid", "kid", "prdc")):
        if args.fid_features == "clip":
            from ..eval.features import ClipFeatures

            features = ClipFeatures(args.clip_model, args.clip_checkpoint, args.clip_pretrained, device=device)
        elif args.fid_features != "inception":
            features = load_features(args.fid_features, device=device)
        else:
            from ..eval.features import InceptionFeatures

            features = InceptionFeatures(args.inception_weights, device=device)
    return pair, features or cmmd_features, cmmd_features


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..eval.generation import Comparison
    from ..eval.provenance import describe, library_versions
    from ..eval.report import write_eval_report
    from ..eval.scoring import SET_METRICS, image_sets_from_folder, parse_metrics, score_sets

    metrics = parse_metrics(args.metrics)
    if any(m in metrics for m in SET_METRICS) and args.reference_images is None:
        raise ValueError("FID/KID need --reference-images DIR (the images to compare against).")
    limits = options.Limits.from_args(args)
    prompts = options.read_prompts(args.prompts, limits.max_prompts) if args.prompts else None
    settings = {"metrics": metrics, "reference_images": args.reference_images}
    if args.images:
        if args.config:
            raise ValueError("--images scores existing images; drop --config (or drop --images to generate).")
        sets = image_sets_from_folder(args.images, prompts)
        settings["images"] = args.images
        device = args.device
    else:
        if not args.model or not prompts or not (args.config or args.sweep):
            raise ValueError(
                "headpag eval needs --model, --prompts and at least one --config or --sweep (or --images DIR)."
            )
        from ..models import load_pipeline
        from ..runtime import describe_transformer

        configs = [parse_eval_config(text) for text in args.config]
        sweeps = [parse_sweep(text) for text in args.sweep]
        swept, sweep_values = expand_sweeps(configs[0] if configs else None, sweeps, args.search_run)
        if swept:
            configs = configs + swept
            settings["sweeps"] = {"parameters": [name for name, _ in sweeps], "values": sweep_values}
        for config in configs:  # the limits `generate` and the UI check, before any work
            config.settings.check()
            limits.check_settings(config.settings)
        seeds = options.parse_seeds(args.seeds, limits.max_seeds)
        comparison = Comparison(prompts, seeds, configs, args.output_dir)
        device, dtype = options.resolve_device_dtype(args.device, args.dtype)
        pipe = load_pipeline(args.model, torch_dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        layout = describe_transformer(pipe.transformer)
        for config in configs:  # a head-set file or preset made for another model family or shape is refused
            if config.flags is not None:
                options.check_preset_fits(config.flags, layout)
        total = len(configs) * len(comparison.items())
        with tqdm(total=total, desc="generating", unit="img", disable=args.no_progress, file=sys.stderr) as bar:
            generated, reused = comparison.generate(pipe, args.model, progress=lambda name: bar.update(1))
        print(f"images: {generated} generated, {reused} reused from {Path(args.output_dir) / 'images'}")
        del pipe
        sets = comparison.image_sets()
        settings.update(model=args.model, prompts=prompts, seeds=seeds, configs={c.name: c.options for c in configs})
    pair, features, cmmd_features = build_metrics(args, metrics, device)
    set_metrics = [m for m in metrics if m in SET_METRICS]
    steps = len(sets) * (len(pair) + (1 if set_metrics else 0))
    with tqdm(total=steps, desc="scoring", disable=args.no_progress, file=sys.stderr) as bar:
        rows = score_sets(
            sets,
            pair,
            features,
            set_metrics,
            args.reference_images,
            args.kid_subsets,
            args.kid_subset_size,
            progress=lambda label: bar.update(1),
            cmmd_features=cmmd_features,
            cache_dir=args.cache_dir,
        )
    settings["provenance"] = {
        "metrics": {name: describe(metric) for name, metric in pair.items()},
        "features": describe(features) if features is not None else None,
        "cmmd_features": describe(cmmd_features) if cmmd_features is not None else None,
        "libraries": library_versions(),
        "command": ["headpag", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith("headpag") else list(sys.argv),
        "images": {row["name"]: row["count"] for row in rows},
    }
    cell = None if args.grid_full_size else args.grid_cell
    report = write_eval_report(args.output_dir, rows, settings, args.grid_rows, cell)
    print(report.read_text().split("\n## ")[0].strip())
    print(f"report: {report}")
    return 0


# ------------------------------------------------------------------------------------------------- eval configs
class _OptionsParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(message)


NAME_PATTERN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9_.+-]*)\s*[=:]\s*(.*)$", re.S)


def config_options_parser() -> argparse.ArgumentParser:
    """The generation flags an evaluation configuration may use (those of `headpag generate` that shape an image)."""
    parser = _OptionsParser(prog="--config NAME=", add_help=False)
    options.add_pag_args(parser)
    parser.add_argument("--negative-prompt", default=None)
    return parser


def parse_eval_config(text: str) -> EvalConfig:
    """`NAME=OPTIONS` (or `NAME: OPTIONS`) -> [`EvalConfig`]. PAG is on only when the options name heads or a
    `--pag-scale`."""
    match = NAME_PATTERN.match(text)
    if not match:
        raise ValueError(
            f"Invalid --config {text!r}: use NAME=OPTIONS with a name of letters, digits, '_', '-', '.', '+', "
            "e.g. 'cfg=--guidance-scale 5' or 'pag-layer=--pag-heads 7 --guidance-scale 1'."
        )
    name, flags = match.groups()
    try:
        args = config_options_parser().parse_args(shlex.split(flags))
    except ValueError as e:
        raise ValueError(
            f"Invalid options for configuration {name!r} ({flags!r}): {e}. Allowed: the generation flags of "
            "`headpag generate` (--pag-heads, --pag-heads-file, --pag-heads-preset, --pag-scale, "
            "--pag-identity-weight, --pag-identity-scope, --pag-target, --pag-interval, --pag-adaptive-scale, "
            "--pag-reuse, --guidance-scale, --true-cfg-scale, --steps, --height, --width, --max-sequence-length, "
            "--negative-prompt)."
        ) from None
    pag_on = bool(args.pag_heads or args.pag_heads_file or args.pag_heads_preset) or args.pag_scale is not None
    settings = options.settings_from_args(args)
    if not pag_on:
        settings.pag_scale = 0.0
    return EvalConfig(name, flags.strip(), settings, args)


# ------------------------------------------------------------------------------------------------------- sweeps
SWEEPABLE = {
    "pag_scale": float,
    "pag_identity_weight": float,
    "pag_adaptive_scale": float,
    "pag_reuse": int,
    "guidance_scale": float,
    "true_cfg_scale": float,
    "num_inference_steps": int,
    "height": int,
    "width": int,
    "max_sequence_length": int,
    "pag_identity_scope": str,
    "pag_target": str,
    "pag_heads": str,
    "top_k": int,
}
MAX_SWEEP_CONFIGS = 64


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """`"pag_scale=1,2,3"` -> `("pag_scale", [1.0, 2.0, 3.0])`; names are generation settings or `top_k`."""
    name, sep, values = str(text).partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in SWEEPABLE:
        raise ValueError(f"Invalid --sweep {text!r}: use NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)}.")
    kind = SWEEPABLE[name]
    parts = [v.strip() for v in values.split(";" if name == "pag_heads" else ",") if v.strip()]
    if not parts:
        raise ValueError(f"--sweep {text!r} has no values.")
    try:
        parsed = [kind(v) for v in parts]
    except ValueError:
        raise ValueError(f"--sweep {text!r}: every value of {name} must be a {kind.__name__}.") from None
    if kind is float and not all(math.isfinite(v) for v in parsed):
        raise ValueError(f"--sweep {text!r}: values must be finite.")
    return name, list(dict.fromkeys(parsed))


def expand_sweeps(
    base: EvalConfig | None, sweeps: list[tuple[str, list[Any]]], search_run: str | None = None
) -> tuple[list[EvalConfig], dict[str, dict[str, Any]]]:
    r"""
    One configuration per combination of the swept values, on top of `base` (or the defaults with PAG on).

    `top_k=K` takes the K best heads of `search_run` (its round-1 ranking, then its selection order). Returns the
    configurations and, per configuration name, its swept values (for the report's plots).
    """
    import itertools

    from ..search.rundir import RunDirectory

    if not sweeps:
        return [], {}
    names = [name for name, _ in sweeps]
    if len(set(names)) != len(names):
        raise ValueError(f"Each parameter may be swept once, got {names}.")
    if "top_k" in names and not search_run:
        raise ValueError("--sweep top_k=... takes its heads from a search: add --search-run RUN_DIR.")
    combos = list(itertools.product(*(values for _, values in sweeps)))
    if len(combos) > MAX_SWEEP_CONFIGS:
        raise ValueError(f"{len(combos)} swept configurations is over the limit of {MAX_SWEEP_CONFIGS}.")
    base_settings = base.settings if base is not None else GenerationSettings()
    configs, values = [], {}
    for combo in combos:
        settings = GenerationSettings(**base_settings.to_dict())
        label = []
        for name, value in zip(names, combo):
            if name == "top_k":
                settings.pag_heads = str(HeadSet(RunDirectory(search_run).top_k_heads(value)))
            else:
                setattr(settings, name, value)
            label.append(f"{name}={value}")
        settings.check()
        name = ",".join(label) if base is None else f"{base.name}[{','.join(label)}]"
        configs.append(EvalConfig(name, " ".join(f"--sweep {x}" for x in label), settings))
        values[name] = dict(zip(names, combo))
    return configs, values
