"""
The shapes-testbed experiments behind `docs/testbed-results.md`: does PAG help a trained model, and which heads?

    python benchmarks/testbed_experiments.py [--out runs/testbed] [--docs docs] [--quick]

Everything runs offline through the `headpag` CLI (in this process) on `headpag-shapes`:

1. HeadHunter searches with the judge objective on their own prompts (exhaustive, halving, gradient + halving);
2. `headpag eval` on held-in prompts (100 prompts x 2 seeds) and on the held-out colour-shape pairs: no guidance,
   CFG, CFG + layer-level PAG at each layer, CFG + the searched heads, SoftPAG `u`, PAG scale `s`, and the metrics
   against the number of heads taken from the search's ranking (the paper's Fig. 4);
3. `docs/testbed-results.md` and its figures, from the reports (`report.json`) alone.

Generation uses `--max-sequence-length 1` (one zero T5 token; the model was trained for any count from 1 to 256, and
the table shows CFG at the pipeline's default 256 too). `--quick` shrinks everything to check the script end to end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers.utils import logging  # noqa: E402

from headpag.cli import main as headpag  # noqa: E402
from headpag.eval.paired import paired_difference  # noqa: E402
from headpag.eval.report import plot_intervals  # noqa: E402
from headpag.models.catalog import builtin_folder, model_defaults  # noqa: E402
from headpag.search.agreement import compare_runs  # noqa: E402
from headpag.search.records import journal_cost  # noqa: E402
from headpag.search.rundir import RunDirectory  # noqa: E402
from headpag.testbed import data  # noqa: E402


logging.set_verbosity_error()  # one zero T5 token: the pipeline warns about truncation on every call


MODEL = "headpag-shapes"
GUIDANCE = model_defaults(MODEL)["guidance"]
PAG_SCALE = 3.0
STEPS = 20
METRICS = ("shapes-correct", "shapes-judge")


def cli(*args: str) -> None:
    print("$ headpag", " ".join(args), flush=True)
    code = headpag(list(args))
    if code != 0:
        raise SystemExit(f"headpag {' '.join(args)} failed with exit code {code}")


def unique_prompts(n: int, seed: int, held_out: bool) -> list[str]:
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        prompt = data.sample_scene(rng, held_out=held_out, positioned=0.5).prompt
        if prompt not in out:
            out.append(prompt)
    return out


def reference_images(folder: Path, n: int, seed: int, held_out: bool) -> Path:
    """`n` fresh procedural images of the prompt distribution (the FID reference), written once."""
    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        data.draw(data.sample_scene(rng, held_out=held_out, positioned=0.5), rng).save(folder / f"{i:05d}.png")
    return folder


def common(max_sequence_length: int | None = 1) -> str:
    msl = f" --max-sequence-length {max_sequence_length}" if max_sequence_length else ""
    return f"--guidance-scale {GUIDANCE} --steps {STEPS}{msl}"


def evaluate(out: Path, prompts: Path, seeds: str, reference: Path, configs: list[str], extra=()) -> dict:
    args = ["eval", "--model", MODEL, "--prompts", str(prompts), "--seeds", seeds, "--output-dir", str(out)]
    args += ["--metrics", ",".join((*METRICS, "fid", "kid")), "--fid-features", "shapes-judge"]
    args += ["--reference-images", str(reference), "--kid-subset-size", "100", "--no-progress"]
    for config in configs:
        args += ["--config", config]
    cli(*args, *extra)
    return json.loads((out / "report.json").read_text())


def search(out: Path, prompts: Path, seeds: str, strategy: str, rounds: int, top_k: int) -> Path:
    if RunDirectory(out).selected_heads_path.is_file():
        return out
    cli(
        "hunt", "--model", MODEL, "--objective", "shapes-judge", "--prompts", str(prompts), "--seeds", seeds,
        "--rounds", str(rounds), "--top-k", str(top_k), "--pag-scale", str(PAG_SCALE), "--pag-identity-weight", "1",
        "--guidance-scale", str(GUIDANCE), "--steps", str(STEPS), "--height", "64", "--width", "64",
        "--max-sequence-length", "1", "--strategy", strategy, "--output-dir", str(out), "--no-progress",
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------------- report
def rows_by_name(report: dict) -> dict[str, dict]:
    return {r["name"]: r for r in report["configurations"]}


_PAIRED: dict[tuple[int, int, str], dict] = {}


def paired(baseline: dict, row: dict, metric: str) -> dict:
    """`paired_difference` once per (baseline, row, metric): tables, verdicts and plots share the bootstrap."""
    key = (id(baseline), id(row), metric)
    if key not in _PAIRED:
        _PAIRED[key] = paired_difference(baseline, row, metric)
    return _PAIRED[key]


def fmt_mean(metric: dict) -> str:
    if "ci95" in metric and "mean" in metric:
        lo, hi = metric["ci95"]
        return f"{metric['mean']:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{metric['value']:.2f} [{metric['ci95'][0]:.2f}, {metric['ci95'][1]:.2f}]"


def fmt_diff(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}], p={d['p_wilcoxon']:.2g}"


def verdict(d: dict) -> str:
    lo, hi = d["ci95"]
    return "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"


def relative(options: str) -> str:
    """Options as a reader can run them from the repository root (no machine paths)."""
    return options.replace(str(ROOT) + "/", "")


def table(rows: list[dict], baseline: dict) -> list[str]:
    lines = [
        "| configuration | options | all attributes right | judge log-prob | FID (judge features) | KID ×10³ | "
        "Δ all right vs CFG (paired) | Δ log-prob vs CFG (paired) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        kid = f"{1000 * m['kid']['mean']:.1f} ± {1000 * m['kid']['std']:.1f}"
        if r is baseline:
            diffs = ["(baseline)", "(baseline)"]
        else:
            diffs = [fmt_diff(paired(baseline, r, metric)) for metric in METRICS]
        lines.append(
            f"| {r['name']} | `{relative(r['options'])}` | {fmt_mean(m['shapes-correct'])} | "
            f"{fmt_mean(m['shapes-judge'])} | "
            f"{fmt_mean(m['fid'])} | {kid} | {diffs[0]} | {diffs[1]} |"
        )
    return lines


def line_plot(path: Path, xs, rows: list[dict], baseline: dict, xlabel: str, title: str, log_x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, metric, label in zip(axes, METRICS, ("all attributes right", "judge log-probability")):
        means = [r["metrics"][metric]["mean"] for r in rows]
        lo = [r["metrics"][metric]["ci95"][0] for r in rows]
        hi = [r["metrics"][metric]["ci95"][1] for r in rows]
        plot_intervals(ax, list(xs), means, lo, hi, line=True)
        base = baseline["metrics"][metric]
        ax.axhline(base["mean"], color="gray", ls="--", lw=1, label="CFG only")
        ax.axhspan(*base["ci95"], color="gray", alpha=0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def side_by_side(path: Path, columns: dict[str, dict], count: int = 8, scale: int = 2) -> None:
    """Rows: configurations; columns: the first `count` prompt-seed pairs (same seeds in every row)."""
    names = list(columns)
    first = columns[names[0]]
    cell, label_w, pad = 64 * scale, 150, 4
    sheet = Image.new("RGB", (label_w + count * (cell + pad), len(names) * (cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(names):
        draw.text((6, row * (cell + pad) + cell // 2 - 6), name, fill="black")
        for col in range(count):
            image = Image.open(columns[name]["images"][col]).convert("RGB").resize((cell, cell), Image.NEAREST)
            assert columns[name]["prompts"][col] == first["prompts"][col]
            sheet.paste(image, (label_w + col * (cell + pad), row * (cell + pad)))
    sheet.save(path)


def write_docs(out: Path, docs: Path, results: dict, seconds: float) -> None:
    figures = docs / "testbed"
    figures.mkdir(parents=True, exist_ok=True)
    weights = builtin_folder(MODEL).parent
    training = json.loads((weights / "training.json").read_text())
    shutil.copy(weights / "loss.png", figures / "loss.png")

    held_in = rows_by_name(results["held_in"])
    topk = results["top_k"]
    held_out = rows_by_name(results["held_out"])
    cfg = held_in["cfg"]
    layers = [held_in[f"layer-{i}"] for i in range(results["num_layers"])]
    line_plot(
        figures / "layers.png", range(len(layers)), layers, cfg, "layer perturbed (all heads)", "Layer-level PAG"
    )
    us = [held_in["heads-u0.25"], held_in["heads-u0.5"], held_in["heads"]]
    line_plot(figures / "softpag.png", [0.25, 0.5, 1.0], us, cfg, "identity weight u", "SoftPAG on the searched heads")
    ss = [held_in["heads-s1"], held_in["heads-s2"], held_in["heads"], held_in["heads-s5"]]
    line_plot(figures / "scale.png", [1, 2, 3, 5], ss, cfg, "PAG scale s", "PAG scale on the searched heads")
    swept = topk["settings"]["sweeps"]["values"]
    k_rows = sorted((r for r in topk["configurations"] if r["name"] in swept), key=lambda r: swept[r["name"]]["top_k"])
    ks = [swept[r["name"]]["top_k"] for r in k_rows]
    line_plot(figures / "top_k.png", ks, k_rows, cfg, "heads (best of the search's ranking)", "Metric vs top-k",
              log_x=True)  # fmt: skip
    side_by_side(figures / "cfg-vs-pag.png", {"CFG": cfg, "CFG + PAG (heads)": held_in["heads"]})
    side_by_side(
        figures / "held-out.png", {"CFG (held-out)": held_out["cfg"], "CFG + PAG (held-out)": held_out["heads"]}
    )

    pairs_in, pairs_out = cfg["count"], held_out["cfg"]["count"]
    best_layer = max(layers, key=lambda r: r["metrics"]["shapes-correct"]["mean"])
    heads_vs_cfg = paired(cfg, held_in["heads"], "shapes-correct")
    soft_vs_cfg = paired(cfg, held_in["heads-u0.25"], "shapes-correct")
    k_diffs = [(k, paired(cfg, r, "shapes-correct")) for k, r in zip(ks, k_rows)]
    best_k = max(k_diffs, key=lambda kd: kd[1]["difference"])
    layer_vs_cfg = paired(cfg, best_layer, "shapes-correct")
    out_vs_cfg = paired(held_out["cfg"], held_out["heads"], "shapes-correct")
    none_vs_cfg = paired(cfg, held_in["none"], "shapes-correct")
    lines = [
        "# The shapes testbed: PAG on a trained model, offline",
        "",
        "`headpag-shapes` is a small Stable Diffusion 3 model trained here, on 2 CPU cores, to draw captioned "
        "procedural shapes (`a {small|large} {colour} {circle|square|triangle} on a {colour} background[ at the "
        "{position}]`); a separate judge CNN reads what it drew. Both ship in the package, so the whole loop, "
        "generate → search → evaluate, runs without downloads. This page is written by "
        "`python benchmarks/testbed_experiments.py` (this run: "
        f"{seconds / 60:.0f} minutes on {training['threads']} CPU threads).",
        "",
        "## The model",
        "",
        "- Data: 64×64 images drawn on the fly (6 colours, 3 shapes, 2 sizes, 5 positions, shape and background "
        "colours differ; small jitter in place, size and tint). `green triangle`, `yellow circle` and `blue square` "
        "never appear in training: the held-out pairs.",
        "- Networks: `AutoencoderKL` 64×64×3 → 16×16×4; `SD3Transformer2DModel` with "
        f"{results['num_layers']} joint blocks × {results['num_heads']} heads (head dim 16), patch 2 (64 image "
        "tokens); two frozen random 2-layer CLIP text encoders over a word-level BPE; a 'null T5' that outputs the "
        "zeros SD3 uses without T5 (so stock `StableDiffusion3Pipeline.from_pretrained(folder)` loads it).",
        f"- Training (`python -m headpag.testbed.train`): VAE {training['seconds']['vae']:.0f} s, judge "
        f"{training['seconds']['judge']:.0f} s, transformer {training['seconds']['transformer']:.0f} s "
        f"({training['schedule']['transformer_steps']} steps × {training['schedule']['transformer_batch']} images, "
        "rectified flow, logit-normal timesteps, 10% empty prompts, EMA); "
        f"{sum(training['seconds'].values()) / 60:.1f} minutes in all.",
        "- Judge accuracy on 2,000 fresh images: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in training["judge_accuracy"].items())
        + ".",
        "",
        "![training losses](testbed/loss.png)",
        "",
        "## Setup",
        "",
        f"- Held-in: {pairs_in} prompt–seed pairs ({pairs_in // 2} prompts × 2 seeds) of the training distribution; "
        f"held-out: {pairs_out} pairs of the held-out colour–shape pairs. Search prompts are separate (12 pairs).",
        f"- {STEPS} steps, CFG scale {GUIDANCE}, PAG scale {PAG_SCALE} and u = 1 unless a row says otherwise; "
        "`--max-sequence-length 1` (the `cfg-t5-256` row is the pipeline's default of 256 zero tokens).",
        "- Metrics, per image: *all attributes right* (the judge reads every attribute the prompt names as asked) and "
        "the judge's mean log-probability of those attributes; per set: FID and KID on the judge's 128-d features "
        "against fresh procedural images of the same distribution (FID's interval resamples generated images).",
        "- FID and KID use the judge's unnormalised features, so their absolute values (KID especially) are large: "
        "compare rows, not other papers. FID's interval resamples the generated images and lies above the point "
        "value (resampling repeats images, which raises FID); it shows spread, not a centred error.",
        "- Paired differences are against CFG on the same prompts and seeds: mean [95% interval from a bootstrap "
        "that resamples prompts, seeds kept with their prompt], Wilcoxon signed-rank p.",
        f"- Heads: HeadHunter (exhaustive, {results['search']['rounds']} rounds × top-{results['search']['top_k']}, "
        f"judge objective) selected {', '.join(f'{l}.{h}' for l, h in results['search']['heads'])} (layer.head).",
        "",
        "## What we found",
        "",
        f"- Guidance matters: no guidance vs CFG, all attributes right {fmt_diff(none_vs_cfg)} "
        f"({verdict(none_vs_cfg)} than CFG).",
        f"- PAG on the searched heads vs CFG alone: {fmt_diff(heads_vs_cfg)} ({verdict(heads_vs_cfg)}); held-out "
        f"pairs: {fmt_diff(out_vs_cfg)} ({verdict(out_vs_cfg)}).",
        f"- Best single layer ({best_layer['name']}) vs CFG: {fmt_diff(layer_vs_cfg)} ({verdict(layer_vs_cfg)}).",
        f"- Best number of searched heads (k = {best_k[0]}) vs CFG: {fmt_diff(best_k[1])} ({verdict(best_k[1])}); "
        f"SoftPAG u = 0.25 on the searched heads: {fmt_diff(soft_vs_cfg)} ({verdict(soft_vs_cfg)}).",
        f"- In short: on this model CFG alone is right in {cfg['metrics']['shapes-correct']['mean']:.1%} of held-in "
        "pairs, and no PAG configuration tried here (every layer, the searched heads, u, s, k) is clearly better "
        "on the Wilcoxon test; strong perturbations (mid and late layers, s = 5, many heads) are clearly worse. "
        "Where an interval is above zero (see the verdicts), its Wilcoxon p is not small, and with this many rows "
        "one such interval is expected by chance."
        if not any(
            verdict(paired(cfg, r, "shapes-correct")) == "better"
            and paired(cfg, r, "shapes-correct")["p_wilcoxon"] < 0.01
            for r in [*held_in.values(), *k_rows]
            if r is not cfg
        )
        else "- Some PAG configuration is better than CFG with p < 0.01: see the tables.",
        "",
        "## Held-in prompts",
        "",
        *table(list(held_in.values()), cfg),
        "",
        "![layer-level PAG](testbed/layers.png)",
        "",
        "![SoftPAG](testbed/softpag.png)",
        "",
        "![PAG scale](testbed/scale.png)",
        "",
        "## Metric against the number of heads (the paper's Fig. 4)",
        "",
        "The k best heads of the search's round-1 ranking (then its selection order), PAG scale "
        f"{PAG_SCALE}, u = 1; the gray band is CFG alone.",
        "",
        *table(k_rows, cfg),
        "",
        "![top-k](testbed/top_k.png)",
        "",
        "## Held-out colour–shape pairs",
        "",
        *table(list(held_out.values()), held_out["cfg"]),
        "",
        "## Search strategies on a trained model",
        "",
        "The same search (judge objective, same prompts and settings) with each strategy; cost in row-evaluations "
        "(transformer rows × tokens, backward = 2 forwards); overlap of the selected heads and Kendall's tau of the "
        "round-1 scores against exhaustive.",
        "",
        "| strategy | row-evaluations | vs exhaustive | selected heads | overlap | Kendall's tau (heads) |",
        "|---|---|---|---|---|---|",
    ]
    base_cost = results["strategies"]["exhaustive"]["row_evals"]
    for name, s in results["strategies"].items():
        heads = ", ".join(f"{l}.{h}" for l, h in s["heads"])
        tau = "-" if s.get("tau") is None else f"{s['tau']:.2f} ({s['n_common']})"
        overlap = "-" if s.get("overlap") is None else f"{s['overlap']:.2f}"
        lines.append(
            f"| {name} | {s['row_evals']:.3g} | {s['row_evals'] / base_cost:.2f}x | {heads} | {overlap} | {tau} |"
        )
    lines += [
        "",
        "## Images",
        "",
        "Held-in, first 8 pairs, same seeds per column:",
        "",
        "![CFG vs PAG](testbed/cfg-vs-pag.png)",
        "",
        "Held-out pairs:",
        "",
        "![held-out](testbed/held-out.png)",
        "",
    ]
    (docs / "testbed-results.md").write_text("\n".join(lines))
    (figures / "results.json").write_text(json.dumps(results["summary"], indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "testbed"))
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    out, docs = Path(args.out), Path(args.docs)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    quick = args.quick
    n_in, n_out, n_search = (6, 4, 3) if quick else (100, 60, 12)
    seeds = "0-1"

    prompt_files = {}
    for name, n, seed, held in (("held_in", n_in, 100, False), ("held_out", n_out, 101, True)):
        prompt_files[name] = out / f"{name}.txt"
        prompt_files[name].write_text("\n".join(unique_prompts(n, seed, held)) + "\n")
    search_prompts = out / "search.txt"
    search_prompts.write_text("\n".join(unique_prompts(n_search, 200, False)) + "\n")
    search_seeds = f"1000-{1000 + n_search - 1}"
    ref_in = reference_images(out / "reference-held-in", 100 if quick else 1000, 300, False)
    ref_out = reference_images(out / "reference-held-out", 100 if quick else 600, 301, True)

    rounds, top_k = (1, 2) if quick else (2, 4)
    runs = {s: search(out / f"search-{s}", search_prompts, search_seeds, s, rounds, top_k) for s in
            ("exhaustive", "halving", "gradient")}  # fmt: skip
    main_run = runs["exhaustive"]
    selected = RunDirectory(main_run).read_selected_doc()
    heads_file = RunDirectory(main_run).selected_heads_path
    config = RunDirectory(main_run).read_config()["config"]
    num_layers, num_heads = selected.get("num_layers"), selected.get("num_heads")
    if num_layers is None:
        from diffusers import SD3Transformer2DModel

        t_config = SD3Transformer2DModel.load_config(builtin_folder(MODEL) / "transformer")
        num_layers, num_heads = t_config["num_layers"], t_config["num_attention_heads"]

    strategies = {}
    for name, run in runs.items():
        records = RunDirectory(run).read_journal()
        entry = {"row_evals": journal_cost(records).row_evals,
                 "heads": RunDirectory(run).read_selected_doc()["heads"]}  # fmt: skip
        if name != "exhaustive":
            c = compare_runs(main_run, run)
            entry.update(overlap=c["overlap"], tau=None if np.isnan(c["tau"]) else c["tau"], n_common=c["n_common"])
        strategies[name] = entry

    pag = f"{common()} --pag-scale {PAG_SCALE}"
    heads = f"{pag} --pag-heads-file {heads_file} --pag-identity-weight 1"
    configs = [
        f"cfg={common()}",
        f"none=--guidance-scale 1 --steps {STEPS} --max-sequence-length 1",
        f"cfg-t5-256={common(None)}",
        *(f"layer-{i}={pag} --pag-heads {i}" for i in range(num_layers)),
        f"heads={heads}",
        f"heads-u0.25={pag} --pag-heads-file {heads_file} --pag-identity-weight 0.25",
        f"heads-u0.5={pag} --pag-heads-file {heads_file} --pag-identity-weight 0.5",
        *(f"heads-s{s}={common()} --pag-heads-file {heads_file} --pag-scale {s}" for s in (1, 2, 5)),
    ]
    held_in = evaluate(out / "eval-held-in", prompt_files["held_in"], seeds, ref_in, configs)
    ks = [k for k in (1, 2, 4, 8, 16, 24, num_layers * num_heads) if k <= num_layers * num_heads]
    top = evaluate(
        out / "eval-top-k",
        prompt_files["held_in"],
        seeds,
        ref_in,
        [f"cfg={common()}"],
        ["--sweep", "top_k=" + ",".join(map(str, ks)), "--sweep", f"pag_scale={PAG_SCALE}"]
        + ["--search-run", str(main_run)],
    )
    rows_in = rows_by_name(held_in)
    best = max(
        (f"layer-{i}" for i in range(num_layers)), key=lambda n: rows_in[n]["metrics"]["shapes-correct"]["mean"]
    )
    held_out = evaluate(
        out / "eval-held-out",
        prompt_files["held_out"],
        seeds,
        ref_out,
        [f"cfg={common()}", f"none=--guidance-scale 1 --steps {STEPS} --max-sequence-length 1", f"heads={heads}",
         f"heads-u0.5={pag} --pag-heads-file {heads_file} --pag-identity-weight 0.5",
         f"{best}={rows_in[best]['options']}"],
    )  # fmt: skip
    summary = {
        name: {r["name"]: {m: r["metrics"][m].get("mean", r["metrics"][m].get("value")) for m in r["metrics"]}
               for r in report["configurations"]}
        for name, report in (("held_in", held_in), ("top_k", top), ("held_out", held_out))
    }  # fmt: skip
    results = {
        "held_in": held_in,
        "top_k": top,
        "held_out": held_out,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "search": {"rounds": config["rounds"], "top_k": config["top_k"], "heads": selected["heads"]},
        "strategies": strategies,
        "summary": {**summary, "strategies": strategies},
    }
    write_docs(out, docs, results, time.perf_counter() - began)
    print(f"wrote {docs / 'testbed-results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
