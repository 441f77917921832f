"""The search report: a layer x head heatmap per round, the selected heads in order, a validation grid."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffusers.utils import logging

from .._io import atomic_write_bytes, atomic_write_text, save_png
from ..eval.grids import image_grid
from ..guidance import HeadSet
from .cost import Cost
from .records import MAX_INDEX, check_head, is_proxy, journal_cost, mean_scores, pair_scores, record_pairs
from .rundir import RunDirectory


logger = logging.get_logger(__name__)


def heatmap_png(
    scores: dict[tuple[int, int], float],
    num_layers: int,
    num_heads: int,
    title: str,
    chosen: list[tuple[int, int]] = (),
) -> bytes:
    """A layer x head heatmap of scores (missing heads blank), chosen heads outlined."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((num_layers, num_heads), np.nan)
    for (layer, head), score in scores.items():
        grid[layer, head] = score
    fig, ax = plt.subplots(figsize=(max(4, num_heads * 0.3 + 2), max(3, num_layers * 0.25 + 1.5)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for layer, head in chosen:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mean objective")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _positive_int(value: Any) -> int | None:
    """`value` when it is a plausible count (an int in 1..`MAX_INDEX`), else `None`."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_INDEX else None


def describe_cost(cost: Cost) -> str:
    """`"N row-evaluations, N images, N s"`."""
    return f"{cost.row_evals:g} row-evaluations, {cost.images:g} images, {cost.seconds:.1f} s"


def _heads(heads) -> str:
    return ", ".join(f"{l}.{h}" for l, h in sorted(heads)) or "none"


def stage_lines(records: list[dict[str, Any]], r: int, chosen: list[tuple[int, int]], complete: bool) -> list[str]:
    """One line per stage of round `r` (from its journal records): pairs, candidates, and who was dropped."""
    pairs: dict[int, set[int]] = {}  # stage -> pair indices it rendered
    heads: dict[int, set[tuple[int, int]]] = {}
    fidelity: dict[int, dict[str, Any]] = {}  # stage -> the proxy fidelity it rendered at (proxy stages only)
    for x in records:
        if x["round"] == r:
            stage = x.get("stage", 0)
            pairs.setdefault(stage, set()).update(record_pairs(x))
            heads.setdefault(stage, set()).add((x["layer"], x["head"]))
            if is_proxy(x):
                fidelity[stage] = x["fidelity"]
    lines, total, was_proxy = [], 0, False
    stages = sorted(heads)
    for i, stage in enumerate(stages):
        proxy = stage in fidelity
        total = len(pairs[stage]) if proxy != was_proxy else total + len(pairs[stage])  # fidelities never mix
        was_proxy = proxy
        line = f"  - stage {stage} ({total} pair{'s' if total != 1 else ''}"
        if proxy:
            f = fidelity[stage]
            line += f", proxy {f['height']}x{f['width']}, {f['steps']} steps"
        line += f"): {len(heads[stage])} candidates"
        if i + 1 < len(stages):
            dropped = heads[stage] - heads[stages[i + 1]]
            line += f"; {len(dropped)} dropped: {_heads(dropped)}"
        elif complete:
            line += f"; chosen: {', '.join(f'{l}.{h}' for l, h in chosen)}"
        else:
            line += " (in progress)"
        lines.append(line)
    return lines


def write_report(
    output_dir: str | os.PathLike, num_layers: int | None = None, num_heads: int | None = None, validation=None
) -> Path:
    """
    Build `output_dir/report/` from the journal and round files (so `headpag hunt --report DIR` can rebuild it).

    Works on any folder that a resume accepts, including a run in progress: the journal is read through the same
    validating reader as a resume ([`~search.journal.read_journal`]: torn, invalid, foreign and duplicate lines are
    skipped with a warning), round files that are missing or malformed count as rounds in progress, and a run with
    nothing scored yet gets a report that says so.

    Args:
        output_dir (`str`): The search directory.
        num_layers, num_heads (`int`, *optional*): Grid size; read from `config.json` or `selected_heads.json` when
            omitted (inferred from the scored heads for runs that recorded neither).
        validation (*optional*): `(pairs, baseline_images, guided_images)` for the validation grid.

    Raises:
        `ValueError`: when the folder has no readable `config.json` (not a HeadHunter run directory).
    """
    out = Path(output_dir)
    run = RunDirectory(out)
    report = run.confined(run.report_dir / "README.md").parent
    meta = run.read_config()
    if meta is None:
        raise ValueError(f"{out} is not a HeadHunter run directory: it has no {run.config_path.name}.")
    config_hash = meta["config_hash"]
    settings = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    heads_doc = run.read_selected_doc() or {}
    num_layers = _positive_int(num_layers) or _positive_int(meta.get("num_layers"))
    num_layers = num_layers or _positive_int(heads_doc.get("num_layers"))
    num_heads = _positive_int(num_heads) or _positive_int(meta.get("num_heads"))
    num_heads = num_heads or _positive_int(heads_doc.get("num_heads"))
    num_rounds = _positive_int(settings.get("rounds"))
    pool: HeadSet | None = None
    if isinstance(settings.get("pool"), str):
        try:
            pool = HeadSet.parse(settings["pool"])
        except ValueError as e:
            logger.warning("%s: the pool %r is invalid (%s); not checked.", run.config_path, settings["pool"], e)
    num_pairs = run.num_pairs(meta)
    records = run.read_journal(
        config_hash, rounds=num_rounds, pool=pool, num_layers=num_layers, num_heads=num_heads, num_pairs=num_pairs
    )

    def valid_head(head: tuple[int, int]) -> bool:
        return check_head(*head, pool, num_layers, num_heads) is None

    # Per round: a complete round file is what a resume uses; otherwise the journal's scores so far.
    rounds: dict[int, tuple[dict[tuple[int, int], float], list[tuple[int, int]], bool]] = {}
    for r in sorted({x["round"] for x in records}):
        rounds[r] = (mean_scores(pair_scores(records, r, num_pairs)), [], False)
    for r in range(num_rounds or (max(rounds, default=-1) + 1)):
        parsed = run.read_round(r)
        if parsed is not None and not all(valid_head(h) for h in parsed[0]):
            logger.warning("%s scores heads outside the model or the pool; ignored.", run.round_path(r))
            parsed = None
        if parsed is not None:
            rounds[r] = (parsed[0], parsed[1], True)
    heads = [h for scores, _, _ in rounds.values() for h in scores]
    num_layers = num_layers or 1 + max((l for l, _ in heads), default=0)
    num_heads = num_heads or 1 + max((h for _, h in heads), default=0)

    strategy = settings.get("strategy", "exhaustive")
    lines = [f"# HeadHunter report: {out}", "", f"Config hash `{config_hash}`, strategy `{strategy}`.", ""]
    if strategy != "exhaustive":
        lines += [
            "Successive halving: a candidate's score is its mean over the pairs it was scored on (the heatmaps mix "
            "fidelities); the stages below say who was dropped where.",
            "",
        ]
    if strategy == "gradient":
        lines += [
            f"Gradient prefilter: each round ranked the whole pool by d objective / d head weight over "
            f"{settings.get('grad_steps', 4)}-step differentiable runs (`rounds/round_R_gradients.json`); only the "
            "kept heads were scored (the heatmaps show those only).",
            "",
        ]
    if not rounds:
        lines.append("No candidate scored yet.")
    order: list[tuple[int, int, float, int]] = []
    for r, (scores, chosen, complete) in sorted(rounds.items()):
        order += [(l, h, scores[(l, h)], r) for l, h in chosen]
        atomic_write_bytes(
            report / f"heatmap_round_{r}.png", heatmap_png(scores, num_layers, num_heads, f"round {r}", chosen)
        )
        status = "complete" if complete else "in progress"
        lines.append(f"- Round {r} ({status}, {len(scores)} candidates scored): ![round {r}](heatmap_round_{r}.png)")
        lines += stage_lines(records, r, chosen, complete)
        lines.append(f"  - cost: {describe_cost(journal_cost(records, r))}")
    lines += ["", "## Selected heads, in order", "", "| # | round | head (layer.head) | score |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {r} | {l}.{h} | {s:.4f} |" for i, (l, h, s, r) in enumerate(order)]
    lines += [
        "",
        "## Cost",
        "",
        f"{describe_cost(journal_cost(records))} in all (the journaled work, parts done before a resume included; "
        "a row-evaluation is one transformer row, clean or perturbed, at the configured size).",
    ]
    if validation is not None:
        pairs, baseline, guided = validation
        save_png(image_grid([[b, g] for b, g in zip(baseline, guided)]), report / "validation.png")
        lines += [
            "",
            "## Validation (left: no PAG, right: selected heads; same seed per row)",
            "",
            "![validation](validation.png)",
            "",
        ]
        lines += [f"{i + 1}. `{p}` seed {s}" for i, (p, s) in enumerate(pairs)]
    elif (report / "validation.png").exists():
        lines += ["", "## Validation (left: no PAG, right: selected heads)", "", "![validation](validation.png)"]
    atomic_write_text(report / "README.md", "\n".join(lines) + "\n")
    return report
