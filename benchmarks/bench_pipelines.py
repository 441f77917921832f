"""
Per-step time and peak memory of head-level PAG against diffusers, in one run, same model, prompt, seed and device.

    python benchmarks/bench_pipelines.py                 # CPU: a 24-layer random SD3 with 64x64 latents
    python benchmarks/bench_pipelines.py --sd3-size      # GPU: SD3-medium-sized random weights (24 x 24 heads)
    python benchmarks/bench_pipelines.py --write         # also rewrite the table in benchmarks/README.md
    python benchmarks/bench_pipelines.py --device cpu --tiny   # a tiny model, 2 steps: the script's own test

Each configuration runs in a subprocess of its own (so peak memory is its own) and warms up once; the configurations
of a group are then timed interleaved, one generation each per round, for several rounds (median), so that drift of
the machine's speed during the run shifts them alike. Ratios are to "CFG only" measured in the same run.
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
REUSE = (2, 3, 4)
CONFIGS = {
    "cfg": "CFG only (diffusers StableDiffusion3Pipeline)",
    "diffusers-pag": f"diffusers StableDiffusion3PAGPipeline, layer {LAYER}",
    "ours-layer": f"ours, layer {LAYER} (joint identity)",
    "ours-layer-image": f"ours, layer {LAYER}, image scope (= diffusers' output)",
    "ours-heads": f"ours, 6 heads over layers {LAYER}-{LAYER + 2}",
    "ours-no-prefix": f"ours, layer {LAYER}, prefix sharing off",
    "ours-sequential": f"ours, layer {LAYER}, sequential perturbed pass",
    **{f"ours-reuse-{k}": f"ours, layer {LAYER}, pag_reuse={k}" for k in REUSE},
    "cfg-compiled": "CFG only, torch.compile(transformer, fullgraph=True)",
    "ours-compiled": f"ours, layer {LAYER}, torch.compile(transformer, fullgraph=True)",
    **{f"ours-reuse-{k}-compiled": f"ours, layer {LAYER}, pag_reuse={k}, compiled (fullgraph)" for k in REUSE},
    "flux-plain": "FLUX: no guidance (diffusers FluxPipeline)",
    "flux-ours": "FLUX: ours, layer 8",
    "flux-plain-compiled": "FLUX: no guidance, compile_repeated_blocks(fullgraph=True)",
    "flux-ours-compiled": "FLUX: ours, layer 8, compile_repeated_blocks(fullgraph=True)",
}


def build(config: str, sd3_size: bool, tiny: bool, device: str, dtype):
    from diffusers import FluxPipeline, StableDiffusion3PAGPipeline, StableDiffusion3Pipeline

    from headpag import FluxHeadPAGPipeline, StableDiffusion3HeadPAGPipeline
    from headpag.models.tiny import tiny_flux_components, tiny_sd3_components

    if config.startswith("flux"):
        if tiny:
            components = tiny_flux_components(seed=0)
        else:  # 8 double + 16 single blocks, narrow; 128x128 -> 1024 packed image tokens
            components = tiny_flux_components(seed=0, num_layers=8, num_single_layers=16, num_heads=4, head_dim=32)
        pipe = (FluxPipeline if config.startswith("flux-plain") else FluxHeadPAGPipeline)(**components)
    else:
        if tiny:
            transformer = {}
        elif sd3_size:  # SD3-medium's transformer shape: 24 layers x 24 heads x 64, 1024^2 -> 4096 image tokens
            transformer = dict(num_layers=24, num_heads=24, head_dim=64, sample_size=128)
        else:  # 24 layers like SD3-medium, narrow; 64x64 latents -> 1024 image tokens
            transformer = dict(num_layers=24, num_heads=4, head_dim=32, sample_size=64)
        components = tiny_sd3_components(seed=0, **transformer)
        if config.startswith("cfg"):
            pipe = StableDiffusion3Pipeline(**components)
        elif config == "diffusers-pag":
            applied = rf"transformer_blocks\.{LAYER if not tiny else 1}\.attn$"
            pipe = StableDiffusion3PAGPipeline(**components, pag_applied_layers=[applied])
        else:
            pipe = StableDiffusion3HeadPAGPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device=device, dtype=dtype)
    if config.endswith("-compiled"):
        import torch

        if config.startswith("flux"):
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        else:
            pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    return pipe


def call_kwargs(config: str, size: int, steps: int, tiny: bool) -> dict:
    kwargs = dict(
        prompt="a lighthouse on a cliff at dusk",
        num_inference_steps=steps,
        height=size,
        width=size,
        output_type="latent",
        max_sequence_length=32,
    )
    layer = 1 if tiny else LAYER
    if config.startswith("flux"):
        return {**kwargs, **({} if config.startswith("flux-plain") else {"pag_heads": str(1 if tiny else 8)})}
    heads = f"{layer}.0, {layer}.1, {layer + 1}.2, {layer + 1}.3, {layer + 2}.0, {layer + 2}.1"
    name = config.removesuffix("-compiled")
    extra = {
        "cfg": {},
        "diffusers-pag": {"pag_scale": 3.0},
        "ours-layer": {"pag_heads": str(layer)},
        "ours-layer-image": {"pag_heads": str(layer), "pag_identity_scope": "image"},
        "ours-heads": {"pag_heads": heads if not tiny else f"{layer}.0, 2.1"},
        "ours-no-prefix": {"pag_heads": str(layer), "pag_share_prefix": False},
        "ours-sequential": {"pag_heads": str(layer), "pag_sequential": True},
        "ours": {"pag_heads": str(layer)},
        **{f"ours-reuse-{k}": {"pag_heads": str(layer), "pag_reuse": k} for k in REUSE},
    }[name]
    return {**kwargs, "guidance_scale": 5.0, **extra}


def serve(config: str, sd3_size: bool, tiny: bool, device: str, steps: int) -> None:
    """
    A worker process: build and warm up `config`, print `ready`, then time one generation per `run` line read from
    stdin (printing its seconds per step), and on `done` print the peak memory and the graphs compiled after the
    warm-up. Keeping every worker of a group alive lets the controller interleave their repeats (A B C A B C ...),
    so that a machine that slows down or speeds up during the run shifts every configuration alike.
    """
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    pipe = build(config, sd3_size, tiny, device, dtype)
    size = 32 if tiny else 1024 if sd3_size else 128
    kwargs = call_kwargs(config, size, steps, tiny)
    from torch._dynamo.utils import counters

    pipe(**kwargs, generator=torch.Generator().manual_seed(0))  # warm up (and compile)
    graphs = counters["stats"]["unique_graphs"]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        print(json.dumps({"step_s": (time.perf_counter() - start) / steps}), flush=True)
    if device.startswith("cuda"):
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process, MB
    new_graphs = counters["stats"]["unique_graphs"] - graphs  # recompiles during the timed calls: must stay 0
    print(json.dumps({"peak_mb": peak_mb, "new_graphs": new_graphs}), flush=True)


# Configurations timed together (interleaved), each group with the baselines its ratios need.
GROUPS = (
    ("cfg", "diffusers-pag", "ours-layer", "ours-layer-image", "ours-heads", "ours-no-prefix", "ours-sequential")
    + tuple(f"ours-reuse-{k}" for k in REUSE),
    ("cfg", "cfg-compiled", "ours-compiled", *(f"ours-reuse-{k}-compiled" for k in REUSE)),
    ("flux-plain", "flux-ours", "flux-plain-compiled", "flux-ours-compiled"),
)


def run_group(configs: list[str], args: argparse.Namespace, device: str) -> dict[str, dict]:
    """Start one worker per configuration, then time `repeats` rounds, each configuration once per round."""
    flags = ["--device", device, "--steps", str(args.steps)]
    flags += (["--sd3-size"] if args.sd3_size else []) + (["--tiny"] if args.tiny else [])
    workers = {}
    try:
        for config in configs:
            workers[config] = subprocess.Popen(
                [sys.executable, __file__, "--worker", config, *flags],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            if workers[config].stdout.readline().strip() != "ready":
                raise RuntimeError(f"worker {config} did not start")
        times: dict[str, list[float]] = {config: [] for config in configs}
        for _ in range(args.repeats):
            for config, worker in workers.items():
                worker.stdin.write("run\n")
                worker.stdin.flush()
                times[config].append(json.loads(worker.stdout.readline())["step_s"])
        results = {}
        for config, worker in workers.items():
            worker.stdin.write("done\n")
            worker.stdin.flush()
            final = json.loads(worker.stdout.readline())
            worker.wait()
            results[config] = {"step_s": statistics.median(times[config]), **final}
            print(f"{config:24s} {results[config]['step_s'] * 1000:9.1f} ms/step", file=sys.stderr)
        return results
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()


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
    parser.add_argument("--tiny", action="store_true", help="The tiny test models, 2 steps, once (a smoke test).")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=None, help="Comma-separated configurations (default: all).")
    parser.add_argument("--write", action="store_true", help="Write the table into benchmarks/README.md.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.steps, args.repeats = 2, 1
    if args.worker:
        serve(args.worker, args.sd3_size, args.tiny, device, args.steps)
        return
    wanted = set(args.only.split(",")) if args.only else set(CONFIGS)
    results: dict[str, dict] = {}
    for group in GROUPS:
        configs = [c for c in group if c in wanted or (c == "cfg" and c in wanted | {"cfg-compiled"})]
        if configs:
            timed = run_group(configs, args, device)
            if "cfg-compiled" in group and "cfg" in timed:  # the compiled group's own CFG-only reference
                timed["cfg@compiled"] = timed.pop("cfg")
            results.update({k: v for k, v in timed.items() if k not in results})
    table = render(results, device, args)
    print(table)
    if args.write and not args.tiny:
        write_table(f"bench_pipelines {'gpu' if device.startswith('cuda') else 'cpu'}", table)


def render(results: dict, device: str, args: argparse.Namespace) -> str:
    """The table: SD3 rows against CFG only and diffusers' PAG (eager), compiled rows also against compiled CFG;
    FLUX rows against FLUX without guidance in the same mode."""
    memory = "extra GPU memory of a generation" if device.startswith("cuda") else "process peak RSS"
    model = "tiny" if args.tiny else "SD3-medium-sized" if args.sd3_size else "24-layer narrow"
    tokens = "1024x1024 (4096 image tokens)" if args.sd3_size else "128x128 (1024 image tokens)"
    lines = [
        f"Machine: {machine(device)}. Model: {model} random SD3 transformer, {tokens}, CFG 5.0, {args.steps} "
        f"steps, median of {args.repeats} interleaved rounds. FLUX: 8 double + 16 single narrow blocks, same "
        f"tokens. Memory: {memory}. Compiled rows are timed with their own CFG-only run (same group).",
        "",
        "| configuration | s/step | time vs CFG only | time vs diffusers PAG | time vs same-mode baseline "
        "| memory (MB) | graphs compiled after warm-up |",
        "|---|---|---|---|---|---|---|",
    ]

    def ratio(config: str, other: str) -> str:
        if config not in results or other not in results:
            return "-"
        return f"{results[config]['step_s'] / results[other]['step_s']:.2f}x"

    for config, label in CONFIGS.items():
        if config not in results:
            continue
        r = results[config]
        flux = config.startswith("flux")
        same_mode = ("flux-plain" if flux else "cfg") + ("-compiled" if config.endswith("-compiled") else "")
        cfg = "cfg@compiled" if config.endswith("-compiled") and "cfg@compiled" in results else "cfg"
        lines.append(
            f"| {label} | {r['step_s']:.3f} | {'-' if flux else ratio(config, cfg)} | "
            f"{'-' if flux else ratio(config, 'diffusers-pag')} | {ratio(config, same_mode)} | {r['peak_mb']:.0f} | "
            f"{r['new_graphs'] if config.endswith('-compiled') else '-'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
