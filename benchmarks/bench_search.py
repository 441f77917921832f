"""
HeadHunter throughput: candidates per second of the batched search against a naive loop that makes one pipeline call
per candidate and prompt (encoding the prompt every time, like the official implementation), in one run.

    python benchmarks/bench_search.py --write
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

from headpag import HeadSet, load_pipeline
from headpag.search import HeadHunter, SearchConfig


HERE = Path(__file__).resolve().parent


def objective(images, prompts):
    return [float(np.asarray(im, dtype=np.float32).mean()) for im in images]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-sd3")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    config = SearchConfig(
        prompts=["a cat", "a lighthouse at dusk"],
        seeds=[0, 1],
        rounds=1,
        top_k=1,
        num_inference_steps=4,
        height=64,
        width=64,
        max_sequence_length=32,
        batch_size=args.batch_size,
    )
    with tempfile.TemporaryDirectory() as tmp:
        hunter = HeadHunter(pipe, objective, config, tmp)
        candidates = hunter.pool()
        start = time.perf_counter()
        hunter.run()
        batched = len(candidates) / (time.perf_counter() - start)

    start = time.perf_counter()
    naive_count = min(len(candidates), 8)
    for layer, head in candidates[:naive_count]:
        for prompt, seed in config.pairs():
            image = pipe(
                prompt,
                pag_heads=HeadSet([(layer, head)]),
                pag_scale=config.pag_scale,
                guidance_scale=config.guidance_scale,
                num_inference_steps=config.num_inference_steps,
                height=config.height,
                width=config.width,
                max_sequence_length=32,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
            objective([image], [prompt])
    naive = naive_count / (time.perf_counter() - start)
    cpu = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    table = "\n".join(
        [
            f"Machine: {cpu}, torch {torch.__version__}. Model: {args.model}, {len(candidates)} candidate heads, "
            f"M={len(config.pairs())} prompt-seed pairs, {config.num_inference_steps} steps, "
            f"{config.height}x{config.width}, batch size {args.batch_size}.",
            "",
            "| search | candidates/s | speed-up |",
            "|---|---|---|",
            f"| naive loop (one pipeline call per candidate and prompt) | {naive:.2f} | 1.00x |",
            f"| HeadHunter, batched | {batched:.2f} | {batched / naive:.2f}x |",
        ]
    )
    print(table)
    if args.write:
        readme = HERE / "README.md"
        marker = "<!-- bench_search -->"
        text = readme.read_text()
        start, end = text.find(marker), text.find(marker, text.find(marker) + 1)
        if start < 0 or end < 0:
            sys.exit(f"{readme} lacks the two {marker} markers")
        readme.write_text(text[: start + len(marker)] + "\n" + table + "\n" + text[end:])


if __name__ == "__main__":
    main()
