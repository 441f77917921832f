"""
HeadHunter strategies against the exhaustive search, in one run: transformer row-evaluations, wall time, top-k
overlap and Kendall's tau, on a tiny SD3 of 8 layers x 8 heads (64 candidates) with 9 prompt-seed pairs.

    python benchmarks/bench_strategies.py            # print the table
    python benchmarks/bench_strategies.py --write    # also rewrite it in benchmarks/README.md

The objective is a planted one (closeness to the images rendered with one hidden head), so every strategy has a
right answer to find; the trained offline testbed (a later issue) will give heads that matter.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from readme_table import write_table


PLANTED = (5, 3)
SETTINGS = dict(
    # Nine distinct prompts, one seed each: the planted objective looks its reference image up by prompt.
    prompts=[
        f"{thing} {place}"
        for thing in ("a red cat", "a lighthouse", "a bowl of fruit")
        for place in ("", "at dusk", "in snow")
    ],
    seeds=list(range(9)),
    pairing="zip",
    rounds=1,
    top_k=3,
    guidance_scale=1.0,
    num_inference_steps=2,
    height=32,
    width=32,
    batch_size=32,
)
STRATEGIES = {
    "exhaustive": {"strategy": "exhaustive"},
    "halving (eta 3, 1 pair first)": {"strategy": "halving"},
    "halving (eta 2, 1 pair first)": {"strategy": "halving", "halving_eta": 2},
    "halving (eta 3) + proxy 16x16, 1 step": {"strategy": "halving", "proxy_size": 16, "proxy_steps": 1},
    "gradient prefilter (2 steps, keep 12) + halving": {"strategy": "gradient", "grad_steps": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="Write the table into benchmarks/README.md.")
    args = parser.parse_args()

    from headpag import HeadSet, StableDiffusion3HeadPAGPipeline
    from headpag.models.tiny import tiny_sd3_components
    from headpag.search import HeadHunter, SearchConfig
    from headpag.search.agreement import compare_runs

    torch.manual_seed(0)
    pipe = StableDiffusion3HeadPAGPipeline(**tiny_sd3_components(num_layers=8, num_heads=8))
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = SearchConfig(**SETTINGS, strategy="halving", proxy_size=16, proxy_steps=1)
        maker = HeadHunter(pipe, lambda i, p: [0.0] * len(i), config, Path(tmp) / "refs")
        items = [(HeadSet([PLANTED]), p, s) for p, s in config.pairs()]
        refs = {}  # (prompt, image size) -> the planted head's image, at full and at proxy fidelity
        for proxy in (False, True):
            for (p, _), im in zip(config.pairs(), maker.generate(items, proxy=proxy)):
                refs[(p, im.size)] = np.asarray(im, np.float32)

        def as_tensor(image) -> torch.Tensor:
            return torch.from_numpy(image / 255).permute(2, 0, 1)

        def objective(images, prompts):
            """Minus the mean absolute difference to the planted head's image (differentiable on tensors)."""
            if isinstance(images, torch.Tensor):
                size = (images.shape[-1], images.shape[-2])
                target = torch.stack([as_tensor(refs[(p, size)]) for p in prompts]).to(images)
                return -(images - target).abs().mean(dim=(1, 2, 3))
            return [
                -float(np.abs(np.asarray(im, np.float32) - refs[(p, im.size)]).mean()) / 255
                for im, p in zip(images, prompts)
            ]

        objective.differentiable = True

        results = {}
        for index, (label, extra) in enumerate(STRATEGIES.items()):
            folder = Path(tmp) / f"run-{index}"
            hunter = HeadHunter(pipe, objective, SearchConfig(**SETTINGS, **extra), folder)
            start = time.perf_counter()
            result = hunter.run()
            seconds = time.perf_counter() - start
            agreement = compare_runs(Path(tmp) / "run-0", folder)
            results[label] = (result, seconds, agreement)
            print(f"{label}: {result.cost} in {seconds:.1f}s, selected {result.order}", file=sys.stderr)

    base, base_seconds, _ = results["exhaustive"]
    lines = [
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        "Model: tiny SD3, 8 layers x 8 heads (64 candidates), 9 prompt-seed pairs, 32x32, 2 steps, top-3, "
        f"planted head L{PLANTED[0]}H{PLANTED[1]}.",
        "",
        "| strategy | row-evaluations | vs exhaustive | images | wall time (s) | vs exhaustive | top-3 overlap | "
        "Kendall's tau (heads both scored on all pairs) | finds the planted head |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, (result, seconds, agreement) in results.items():
        tau = agreement["tau"]
        tau_text = f"{tau:.2f} ({agreement['n_common']} heads)" if tau == tau else "-"
        rows = result.cost["row_evals"]
        lines.append(
            f"| {label} | {rows:.0f} | {rows / base.cost['row_evals']:.2f}x | "
            f"{result.cost['images']:.0f} | {seconds:.1f} | {seconds / base_seconds:.2f}x | "
            f"{agreement['overlap']:.2f} | {tau_text} | {'yes' if PLANTED in result.order else 'no'} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_table("bench_strategies", table)


if __name__ == "__main__":
    main()
