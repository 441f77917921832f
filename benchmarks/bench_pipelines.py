"""
Per-step time and peak memory of head-level PAG against diffusers, in one run, same model, prompt, seed and device.

    python benchmarks/bench_pipelines.py                 # CPU: a 24-layer random SD3 with 64x64 latents
    python benchmarks/bench_pipelines.py --sd3-size      # GPU: SD3-medium-sized random weights (24 x 24 heads)
    python benchmarks/bench_pipelines.py --write         # also rewrite the table in benchmarks/README.md

Each configuration runs in a fresh subprocess (so peak memory is its own), warms up once, then times the denoising
loop over several repeats (median). Ratios are to "CFG only" measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

from readme_table import write_table


LAYER = 7
CONFIGS = {
    "cfg": "CFG only (diffusers StableDiffusion3Pipeline)",
    "diffusers-pag": f"diffusers StableDiffusion3PAGPipeline, layer {LAYER}",
    "ours-layer": f"ours, layer {LAYER} (joint identity)",
    "ours-layer-image": f"ours, layer {LAYER}, image scope (= diffusers' output)",
    "ours-heads": f"ours, 6 heads over layers {LAYER}-{LAYER + 2}",
    "ours-no-prefix": f"ours, layer {LAYER}, prefix sharing off",
    "ours-sequential": f"ours, layer {LAYER}, sequential perturbed pass",
    "cfg-compiled": "CFG only, torch.compile(transformer)",
    "ours-compiled": f"ours, layer {LAYER}, torch.compile(transformer)",
}


def build(config: str, sd3_size: bool, device: str, dtype):
    from diffusers import StableDiffusion3PAGPipeline, StableDiffusion3Pipeline

    from headpag import StableDiffusion3HeadPAGPipeline
    from headpag.pipelines.tiny import tiny_sd3_components

    if sd3_size:  # SD3-medium's transformer shape: 24 layers x 24 heads x 64, 1024^2 -> 4096 image tokens
        transformer = dict(num_layers=24, num_heads=24, head_dim=64, sample_size=128)
    else:  # 24 layers like SD3-medium, narrow; 64x64 latents -> 1024 image tokens
        transformer = dict(num_layers=24, num_heads=4, head_dim=32, sample_size=64)
    components = tiny_sd3_components(seed=0, **transformer)
    if config == "cfg":
        pipe = StableDiffusion3Pipeline(**components)
    elif config == "diffusers-pag":
        pipe = StableDiffusion3PAGPipeline(**components, pag_applied_layers=[rf"transformer_blocks\.{LAYER}\.attn$"])
    elif config == "cfg-compiled":
        pipe = StableDiffusion3Pipeline(**components)
    else:
        pipe = StableDiffusion3HeadPAGPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device=device, dtype=dtype)
    if config.endswith("-compiled"):
        import torch

        pipe.transformer = torch.compile(pipe.transformer)
    return pipe


def call_kwargs(config: str, size: int, steps: int) -> dict:
    kwargs = dict(
        prompt="a lighthouse on a cliff at dusk",
        num_inference_steps=steps,
        height=size,
        width=size,
        guidance_scale=5.0,
        output_type="latent",
        max_sequence_length=32,
    )
    heads = f"{LAYER}.0, {LAYER}.1, {LAYER + 1}.2, {LAYER + 1}.3, {LAYER + 2}.0, {LAYER + 2}.1"
    extra = {
        "cfg": {},
        "diffusers-pag": {"pag_scale": 3.0},
        "ours-layer": {"pag_heads": str(LAYER)},
        "ours-layer-image": {"pag_heads": str(LAYER), "pag_identity_scope": "image"},
        "ours-heads": {"pag_heads": heads},
        "ours-no-prefix": {"pag_heads": str(LAYER), "pag_share_prefix": False},
        "ours-sequential": {"pag_heads": str(LAYER), "pag_sequential": True},
        "cfg-compiled": {},
        "ours-compiled": {"pag_heads": str(LAYER)},
    }[config]
    return {**kwargs, **extra}


def worker(config: str, sd3_size: bool, device: str, steps: int, repeats: int) -> dict:
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    pipe = build(config, sd3_size, device, dtype)
    size = 1024 if sd3_size else 128
    kwargs = call_kwargs(config, size, steps)
    # Warm up (and compile), then measure the extra memory of one generation beyond the loaded model.
    from torch._dynamo.utils import counters

    pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    graphs = counters["stats"]["unique_graphs"]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / steps)
    if device.startswith("cuda"):
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process, MB
    new_graphs = counters["stats"]["unique_graphs"] - graphs  # recompiles during the timed calls: must stay 0
    return {"config": config, "step_s": statistics.median(times), "peak_mb": peak_mb, "new_graphs": new_graphs}


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default=None)
    parser.add_argument("--sd3-size", action="store_true", help="SD3-medium-sized random transformer (GPU).")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="Write the table into benchmarks/README.md.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        print(json.dumps(worker(args.worker, args.sd3_size, device, args.steps, args.repeats)))
        return
    results = {}
    for config in CONFIGS:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            config,
            "--device",
            device,
            "--steps",
            str(args.steps),
            "--repeats",
            str(args.repeats),
        ] + (["--sd3-size"] if args.sd3_size else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[config] = json.loads(out)
        print(
            f"{config:18s} {results[config]['step_s'] * 1000:9.1f} ms/step  peak {results[config]['peak_mb']:.0f} MB",
            file=sys.stderr,
        )
    base = results["cfg"]
    memory = "extra GPU memory of a generation" if device.startswith("cuda") else "process peak RSS"
    lines = [
        f"Machine: {machine(device)}. Model: {'SD3-medium-sized' if args.sd3_size else '24-layer narrow'} random "
        f"SD3 transformer, {'1024x1024 (4096 image tokens)' if args.sd3_size else '128x128 (1024 image tokens)'}, "
        f"CFG 5.0, {args.steps} steps, median of {args.repeats}. Memory: {memory}.",
        "",
        "| configuration | s/step | time vs CFG only | time vs diffusers PAG | memory (MB) | memory vs CFG only "
        "| graphs compiled after warm-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for config, label in CONFIGS.items():
        r = results[config]
        lines.append(
            f"| {label} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f}x | "
            f"{r['step_s'] / results['diffusers-pag']['step_s']:.2f}x | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] / base['peak_mb']:.2f}x | {r['new_graphs'] if config.endswith('-compiled') else '-'} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_table(f"bench_pipelines {'gpu' if device.startswith('cuda') else 'cpu'}", table)


if __name__ == "__main__":
    main()
