"""The comparison report: `report.json`, `report.md` (one row per configuration), bar plots and image grids."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .._io import atomic_write_bytes, atomic_write_json, atomic_write_text, save_png
from .grids import DEFAULT_CELL, image_grid
from .paired import paired_table


LABELS = {
    "clip": "CLIP score (higher is better)",
    "pickscore": "PickScore (higher is better)",
    "aesthetic": "LAION aesthetic (higher is better)",
    "hpsv2": "HPSv2 (higher is better)",
    "imagereward": "ImageReward (higher is better)",
    "shapes-judge": "judge log-probability (higher is better)",
    "shapes-correct": "all attributes right (share)",
    "shapes-structure": "shape IoU minus stray area (higher is better)",
    "fid": "FID (lower is better)",
    "kid": "KID ×10³ (lower is better)",
    "prdc": "precision / recall / density / coverage (higher is better)",
    "cmmd": "CMMD (lower is better)",
}


def format_metric(value: dict[str, Any]) -> str:
    """`mean [lo, hi]` (per-image metrics), `mean ± std` (KID), P/R/D/C, or the point value (FID, CMMD)."""
    if "precision" in value:
        return " / ".join(f"{value[k]:.3f}" for k in ("precision", "recall", "density", "coverage"))
    if "value" in value:  # FID (with its bootstrap interval over images), CMMD
        interval = f" [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]" if "ci95" in value else ""
        counts = f" (n={value['generated']})" if "generated" in value else ""
        return f"{value['value']:.3f}{interval}{counts}{' ⚠' if 'warning' in value else ''}"
    if "ci95" in value:
        lo, hi = value["ci95"]
        return f"{value['mean']:.3f} [{lo:.3f}, {hi:.3f}]"
    if "std" in value:  # KID, shown x 10^3 as is conventional
        subset = f" (subsets of {value['subset_size']})" if "subset_size" in value else ""
        return f"{1000 * value['mean']:.2f} ± {1000 * value['std']:.2f}{subset}"
    return f"{value['value']:.3f}"


def format_paired(value: dict[str, Any]) -> str:
    """`+0.123 [+0.010, +0.240], p=0.012, wins 64%`."""
    lo, hi = value["ci95"]
    return (
        f"{value['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}], p={value['p_wilcoxon']:.3g}, "
        f"wins {100 * value['win_rate']:.0f}%"
    )


def plot_intervals(ax, xs, ys, lows=None, highs=None, color: str = "#4c72b0", line: bool = False) -> None:
    """Points (joined when `line`) with their intervals drawn as given: an interval need not contain its point (a
    bootstrap interval of FID lies above the point value, since resampling repeats images)."""
    ax.plot(xs, ys, "o-" if line else "o", color=color)
    if lows is not None:
        ax.vlines(xs, lows, highs, color=color)
        ax.plot(xs, lows, "_", xs, highs, "_", color=color, markersize=10)


def bar_plot_png(rows: Sequence[dict[str, Any]], metric: str) -> bytes:
    """A dot per configuration with its 95% interval (per-image metrics) or std (KID), on a fitted axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    values = [r["metrics"][metric] for r in rows]
    scale = 1000.0 if metric == "kid" else 1.0  # KID is shown x 10^3
    heights = [scale * v.get("mean", v.get("value")) for v in values]
    lows = highs = None
    if "ci95" in values[0]:
        lows, highs = [v["ci95"][0] for v in values], [v["ci95"][1] for v in values]
    elif "std" in values[0]:
        lows = [h - scale * v["std"] for h, v in zip(heights, values)]
        highs = [h + scale * v["std"] for h, v in zip(heights, values)]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 1), 3.2))
    # Dots with intervals on an axis fitted to the values (bars from zero would hide the differences).
    positions = list(range(len(names)))
    plot_intervals(ax, positions, heights, lows, highs)
    ax.set_xticks(positions, names)
    ax.margins(x=0.15, y=0.2)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(LABELS.get(metric, metric))
    ax.tick_params(axis="x", rotation=20)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def sweep_plot_png(rows: Sequence[dict[str, Any]], sweeps: dict[str, Any], metric: str) -> bytes:
    """
    A metric against one swept setting (line with 95% intervals, one line per other configuration), or a heatmap of
    its mean over two swept settings (the paper's Figs. 4, 10, 11).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params, values = sweeps["parameters"], sweeps["values"]
    swept = [r for r in rows if r["name"] in values and metric in r["metrics"]]
    scale = 1000.0 if metric == "kid" else 1.0
    mean = lambda r: scale * r["metrics"][metric].get("mean", r["metrics"][metric].get("value"))  # noqa: E731
    fig, ax = plt.subplots(figsize=(5, 3.4))
    if len(params) == 1:
        (param,) = params
        swept.sort(key=lambda r: values[r["name"]][param])
        xs = [values[r["name"]][param] for r in swept]
        ys = [mean(r) for r in swept]
        lows = highs = None
        if all("ci95" in r["metrics"][metric] for r in swept):
            lows = [scale * r["metrics"][metric]["ci95"][0] for r in swept]
            highs = [scale * r["metrics"][metric]["ci95"][1] for r in swept]
        categorical = not all(isinstance(x, (int, float)) for x in xs)
        positions = list(range(len(xs))) if categorical else xs
        plot_intervals(ax, positions, ys, lows, highs, line=True)
        if categorical:
            ax.set_xticks(positions, [str(x) for x in xs], rotation=20)
        ax.set_xlabel(param)
        ax.grid(alpha=0.3)
    else:
        first, second = params[:2]
        xs = sorted({values[r["name"]][first] for r in swept}, key=str)
        ys = sorted({values[r["name"]][second] for r in swept}, key=str)
        grid = [[float("nan")] * len(xs) for _ in ys]
        for r in swept:
            grid[ys.index(values[r["name"]][second])][xs.index(values[r["name"]][first])] = mean(r)
        image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        fig.colorbar(image, ax=ax)
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xlabel(first)
        ax.set_ylabel(second)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="white", fontsize=8)
    ax.set_title(LABELS.get(metric, metric))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def write_eval_report(
    output_dir: str | os.PathLike,
    rows: Sequence[dict[str, Any]],
    settings: dict[str, Any],
    grid_rows: int = 8,
    grid_cell: int | None = DEFAULT_CELL,
) -> Path:
    r"""
    Write `report.json`, `report.md`, `plots/<metric>.png` and `grids/grid_<k>.png` (one column per configuration,
    one prompt-seed pair per row) into `output_dir`.

    Args:
        output_dir (`str`): The comparison directory.
        rows (`list[dict]`): From [`score_sets`].
        settings (`dict`): Recorded in `report.json` (model, prompts, seeds, metrics...).
        grid_rows (`int`, defaults to 8): Pairs per grid image.
        grid_cell (`int`, *optional*, defaults to 256): Longest side of a grid tile; `None` for full size.

    Returns:
        `Path` of `report.md`.
    """
    out = Path(output_dir)
    metrics = list(rows[0]["metrics"]) if rows else []
    pair_metrics = [m for m in metrics if m in rows[0].get("per_image", {})]
    paired = paired_table(rows, pair_metrics) if len(rows) > 1 and pair_metrics else None
    atomic_write_json(out / "report.json", {"settings": settings, "configurations": list(rows), "paired": paired})
    lines = [f"# Comparison: {out}", ""]
    if settings.get("model"):
        lines.append(f"Model `{settings['model']}`; {rows[0]['count'] if rows else 0} images per configuration.")
    if paired:
        lines += [
            "",
            f"## Against `{paired['baseline']}` (paired, same prompts and seeds)",
            "",
            "Mean difference [95% interval resampling prompts, seeds kept with their prompt], Wilcoxon signed-rank "
            "p on per-prompt mean differences, share of pairs won.",
            "",
            "| configuration | " + " | ".join(LABELS.get(m, m) for m in pair_metrics) + " |",
            "|---|" + "---|" * len(pair_metrics),
        ]
        for name, by_metric in paired["comparisons"].items():
            cells = " | ".join(format_paired(by_metric[m]) for m in pair_metrics)
            lines.append(f"| {name} | {cells} |")
        lines += ["", "## Per configuration", ""]
    lines += [
        "Per-image metrics: mean [95% interval resampling prompts]; FID: value [95% interval resampling the generated "
        "images] (n images; ⚠ below 2048 images, where FID is biased upward); KID ×10³: mean ± std over random "
        "subsets; CMMD: value.",
        "",
        "| configuration | options | images | " + " | ".join(LABELS.get(m, m) for m in metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    for r in rows:
        cells = " | ".join(format_metric(r["metrics"][m]) for m in metrics)
        lines.append(f"| {r['name']} | `{r['options'] or '-'}` | {r['count']} | {cells} |")
    warnings = [
        f"- {r['name']}: {r['metrics']['fid']['warning']}" for r in rows if "warning" in r["metrics"].get("fid", {})
    ]
    if warnings:
        lines += ["", *warnings]
    if metrics:
        lines += ["", "## Plots", ""]
    for metric in [m for m in metrics if m != "prdc"]:  # P/R/D/C are four numbers: the table shows them
        atomic_write_bytes(out / "plots" / f"{metric}.png", bar_plot_png(rows, metric))
        lines.append(f"![{metric}](plots/{metric}.png)")
        if settings.get("sweeps"):
            name = f"sweep_{metric}.png"
            atomic_write_bytes(out / "plots" / name, sweep_plot_png(rows, settings["sweeps"], metric))
            lines.append(f"![{metric} against {' x '.join(settings['sweeps']['parameters'])}](plots/{name})")
    grids = _write_grids(out, rows, grid_rows, grid_cell)
    if grids:
        lines += ["", "## Images (one column per configuration, same prompt and seed per row)", ""]
        lines += [f"![grid {k}](grids/{path.name})" for k, path in enumerate(grids)]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def _write_grids(
    out: Path, rows: Sequence[dict[str, Any]], grid_rows: int, cell: int | None = DEFAULT_CELL
) -> list[Path]:
    if not rows:
        return []
    count = min(len(r["images"]) for r in rows)
    names = [r["name"] for r in rows]
    first = rows[0]
    seeds = first.get("seeds") or [None] * count
    labels = [f"{first['prompts'][i]}" + (f" (seed {seeds[i]})" if seeds[i] is not None else "") for i in range(count)]
    paths = []
    for k, start in enumerate(range(0, count, grid_rows)):
        stop = min(count, start + grid_rows)
        grid = [[Image.open(r["images"][i]).convert("RGB") for r in rows] for i in range(start, stop)]
        image = image_grid(grid, column_labels=names, row_labels=labels[start:stop], cell=cell)
        paths.append(save_png(image, out / "grids" / f"grid_{k}.png"))
    return paths
