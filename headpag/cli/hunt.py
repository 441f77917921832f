"""`headpag hunt`: run, resume, or report a HeadHunter search from the command line."""

from __future__ import annotations

import argparse
import sys
import time

from .. import options
from ..eval.registry import pair_metric_names


def add_parser(sub) -> None:
    p = sub.add_parser("hunt", help="Search for the heads to perturb (HeadHunter).")
    p.add_argument("--report", metavar="DIR", default=None, help="Only rebuild the report of a search directory.")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        default=None,
        help="Only compare two search directories: top-k overlap and Kendall's tau of their round-1 scores.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="Hub id, local folder, headpag-shapes / headpag-shapes-flux (trained, offline), or tiny-sd3 / "
        "tiny-sd35 / tiny-flux.",
    )
    p.add_argument("--dtype", choices=options.DTYPES, default=None)
    p.add_argument("--device", default=None, help="Device (default: this process's accelerate device).")
    p.add_argument(
        "--preset",
        choices=["general", "style"],
        default=None,
        help="The paper's settings: general (M=20, R=1, k=24, u=0.25) or style (R=5, k=3).",
    )
    p.add_argument("--prompts", default=None, help="Prompt file (one per line) or a single prompt.")
    p.add_argument("--seeds", default=None, help="Seeds, e.g. 0-4 or 0,3,7 (zipped with prompts, or one for all).")
    p.add_argument("--pairing", choices=["zip", "product"], default=None)
    p.add_argument("--style", default=None, help="Style prompt: prompts become '{style}, {prompt}'.")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--rounds", type=options.positive(int), default=None)
    p.add_argument("--top-k", type=options.positive(int), default=None)
    p.add_argument("--pool", default=None, help="Restrict candidates to a head spec, e.g. '0-11'.")
    p.add_argument(
        "--objective",
        choices=["clip", "pickscore", "aesthetic", "hpsv2", "imagereward", *pair_metric_names()],
        default="pickscore",
    )
    p.add_argument(
        "--objective-model",
        default=None,
        help="CLIP: checkpoint file (.safetensors or torch, weights only). PickScore: folder or hub id. aesthetic: "
        "the LAION head file (CLIP ViT-L-14 from $HEADPAG_CLIP_CHECKPOINT). hpsv2: the HPS checkpoint. "
        "imagereward: ImageReward.pt (--objective-arch: the BERT tokenizer).",
    )
    p.add_argument("--objective-arch", default=None, help="CLIP: open_clip model name or config JSON.")
    p.add_argument("--pag-scale", type=options.finite_float, default=None)
    p.add_argument("--pag-identity-weight", type=options.finite_float, default=None)
    p.add_argument("--pag-identity-scope", choices=["joint", "image"], default=None)
    p.add_argument(
        "--pag-reuse", type=options.positive(int), default=None, help="Perturbed branch every k steps (default 1)."
    )
    p.add_argument(
        "--guidance-scale",
        type=options.finite_float,
        default=None,
        help="SD3: CFG scale (default 0: off). FLUX: the distilled guidance embedding.",
    )
    p.add_argument(
        "--true-cfg-scale",
        type=options.finite_float,
        default=None,
        help="FLUX only: true CFG (with --negative-prompt).",
    )
    p.add_argument("--steps", type=options.positive(int), default=None)
    p.add_argument("--height", type=options.positive(int), default=None)
    p.add_argument("--width", type=options.positive(int), default=None)
    p.add_argument("--max-sequence-length", type=options.positive(int), default=None)
    p.add_argument(
        "--batch-size", type=options.positive(int), default=None, help="Images per transformer call (default 8)."
    )
    p.add_argument(
        "--strategy",
        choices=["exhaustive", "halving", "gradient"],
        default=None,
        help="exhaustive (default: every candidate on every pair), halving (successive halving in each round) or "
        "gradient (rank the pool by d objective / d head weight, then halving over the best --prefilter-keep; "
        "needs a differentiable objective such as clip).",
    )
    p.add_argument(
        "--grad-steps",
        type=options.positive(int),
        default=None,
        help="gradient: sampling steps of the differentiable run that ranks the pool (default 4).",
    )
    p.add_argument(
        "--prefilter-keep",
        type=options.positive(int),
        default=None,
        help="gradient: heads of the gradient ranking scored exactly (default 4 x --top-k).",
    )
    p.add_argument(
        "--halving-min-pairs",
        type=options.positive(int),
        default=None,
        help="halving: pairs of the first stage (default 1).",
    )
    p.add_argument(
        "--halving-eta",
        type=options.positive(int),
        default=None,
        help="halving: keep 1/eta of the candidates and multiply the pairs by eta at each stage (default 3, >= 2).",
    )
    p.add_argument(
        "--proxy-size",
        type=options.positive(int),
        default=None,
        help="halving: render the early stages at N x N (the last stage at --height x --width).",
    )
    p.add_argument(
        "--proxy-steps",
        type=options.positive(int),
        default=None,
        help="halving: sampling steps of the early stages (the last stage uses --steps).",
    )
    p.add_argument("--output-dir", default="runs/headhunter")
    p.add_argument(
        "--validation-images", type=options.positive(int), default=4, help="Pairs in the report's validation grid."
    )
    p.add_argument("--no-progress", action="store_true")
    options.Limits().add_arguments(p, options.WORK_LIMITS)


def build_config(args: argparse.Namespace, family: str, limits: options.Limits | None = None):
    from ..search.config import SearchConfig, preset

    limits = limits or options.Limits.from_args(args)
    values = preset(args.preset, family) if args.preset else {}
    explicit = {
        "prompts": options.read_prompts(args.prompts, limits.max_prompts) if args.prompts else None,
        "seeds": options.parse_seeds(args.seeds, limits.max_seeds) if args.seeds else None,
        "pairing": args.pairing,
        "style_prompt": args.style,
        "negative_prompt": args.negative_prompt,
        "rounds": args.rounds,
        "top_k": args.top_k,
        "pool": args.pool,
        "pag_scale": args.pag_scale,
        "pag_identity_weight": args.pag_identity_weight,
        "pag_identity_scope": args.pag_identity_scope,
        "pag_reuse": args.pag_reuse,
        "guidance_scale": args.guidance_scale,
        "true_cfg_scale": args.true_cfg_scale,
        "num_inference_steps": args.steps,
        "height": args.height,
        "width": args.width,
        "max_sequence_length": args.max_sequence_length,
        "batch_size": args.batch_size,
        "strategy": getattr(args, "strategy", None),
        "halving_min_pairs": getattr(args, "halving_min_pairs", None),
        "halving_eta": getattr(args, "halving_eta", None),
        "proxy_size": getattr(args, "proxy_size", None),
        "proxy_steps": getattr(args, "proxy_steps", None),
        "grad_steps": getattr(args, "grad_steps", None),
        "prefilter_keep": getattr(args, "prefilter_keep", None),
    }
    values.update({k: v for k, v in explicit.items() if v is not None})
    if "prompts" not in values:
        raise ValueError("headpag hunt needs --prompts FILE_OR_TEXT or a --preset.")
    if args.seeds and args.prompts and len(values["seeds"]) not in (1, len(values["prompts"])) and not args.pairing:
        values["pairing"] = "product"
    config = SearchConfig(**values)
    check_limits(config, limits)
    return config


def check_limits(config, limits: options.Limits) -> None:
    """The generation limits `generate` and the UI check, on every image the search renders, before any work."""
    from ..pipelines.settings import GenerationSettings

    limits.check_settings(
        GenerationSettings(
            prompt=max(config.prompts, key=len),
            negative_prompt=config.negative_prompt,
            pag_scale=config.pag_scale,
            guidance_scale=config.guidance_scale,
            true_cfg_scale=config.true_cfg_scale,
            num_inference_steps=config.num_inference_steps,
            height=config.height,
            width=config.width,
            num_images=min(config.batch_size, limits.max_images),
        )
    )
    for name in ("proxy_steps", "grad_steps"):  # the other fidelities, bounded like the main one
        if getattr(config, name) is not None and getattr(config, name) > limits.max_steps:
            limits.refuse(name, getattr(config, name), "max_steps")
    if config.proxy_size is not None and config.proxy_size > limits.max_size:
        limits.refuse("proxy_size", config.proxy_size, "max_size")


class Progress:
    """candidates done, rate, time left (a tqdm bar on the main process)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if self.bar is None or self.bar.total != total or done == 0:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=total, unit="cand", desc="HeadHunter", file=sys.stderr)
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from ..search.cost import Cost
    from ..search.report import describe_cost, write_report
    from ..search.rundir import RunDirectory

    if getattr(args, "compare", None):
        from ..search.agreement import compare_runs, format_comparison

        run_a, run_b = args.compare
        print(format_comparison(run_a, run_b, compare_runs(run_a, run_b)))
        return 0
    if args.report:
        report = write_report(args.report)
        print(f"report: {report / 'README.md'}")
        return 0
    if not args.model:
        raise ValueError("headpag hunt needs --model (or --report DIR, or --compare RUN_A RUN_B).")
    from ..models import load_pipeline
    from ..runtime import describe_transformer
    from ..search.hunter import HeadHunter, process_state
    from ..search.strategies import projected_work

    state = process_state()
    device, dtype = options.resolve_device_dtype(args.device or str(state.device), args.dtype)
    pipe = load_pipeline(args.model, torch_dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    layout = describe_transformer(pipe.transformer)
    config = build_config(args, layout.family)
    pool_size = len(config.pool_heads(layout.num_layers, layout.num_heads))
    options.Limits.from_args(args).check_search_budget(*projected_work(config, pool_size))
    progress = Progress(enabled=not args.no_progress and state.is_main_process)
    hunter = HeadHunter(
        pipe,
        args.objective,
        config,
        args.output_dir,
        objective_model=args.objective_model,
        objective_arch=args.objective_arch,
        model_name=args.model,
        progress=progress,
    )
    start = time.monotonic()
    result = hunter.run()
    progress.close()
    if state.is_main_process:
        validation = hunter.validation_images(args.validation_images) if args.validation_images > 0 else None
        report = write_report(args.output_dir, result.num_layers, result.num_heads, validation)
        print(
            f"HeadHunter: {len(result.order)} heads selected in {time.monotonic() - start:.1f}s "
            f"({config.rounds} rounds, top-{config.top_k}, M={len(config.pairs())})"
        )
        for i, (r, head) in enumerate((r, h) for r, rd in enumerate(result.rounds) for h in rd["chosen"]):
            print(f"  {i + 1:3d}. round {r}: {head[0]}.{head[1]}  score {result.rounds[r]['scores'][head]:.4f}")
        print(f"cost ({config.strategy}, whole run, resumed parts included): {describe_cost(Cost(**result.cost))}")
        print(f"heads: {RunDirectory(args.output_dir).selected_heads_path}  (use --pag-heads-file)")
        print(f"report: {report / 'README.md'}")
    return 0
