"""The search report: a layer x head heatmap per round, the selected heads in order, a validation grid."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._io import atomic_write_bytes, atomic_write_text, save_png
from ..eval.grids import image_grid
from .journal import read_journal


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


def write_report(
    output_dir: str | os.PathLike, num_layers: int | None = None, num_heads: int | None = None, validation=None
) -> Path:
    """
    Build `output_dir/report/` from the journal and round files (so `headpag hunt --report DIR` can rebuild it).

    Args:
        output_dir (`str`): The search directory.
        num_layers, num_heads (`int`, *optional*): Grid size; read from `selected_heads.json` when omitted.
        validation (*optional*): `(pairs, baseline_images, guided_images)` for the validation grid.
    """
    out = Path(output_dir)
    report = out / "report"
    meta = json.loads((out / "config.json").read_text())
    heads_file = out / "selected_heads.json"
    heads_doc = json.loads(heads_file.read_text()) if heads_file.exists() else {}
    num_layers = num_layers or heads_doc.get("num_layers")
    num_heads = num_heads or heads_doc.get("num_heads")
    records = read_journal(out / "journal.jsonl", meta["config_hash"])
    if not records:
        raise ValueError(f"{out} has no journal entries to report.")
    num_layers = num_layers or 1 + max(r["layer"] for r in records)
    num_heads = num_heads or 1 + max(r["head"] for r in records)
    lines = [f"# HeadHunter report: {out}", "", f"Config hash `{meta['config_hash']}`.", ""]
    rounds = sorted({r["round"] for r in records})
    order: list[tuple[int, int, float, int]] = []
    for r in rounds:
        scores = {(x["layer"], x["head"]): x["score"] for x in records if x["round"] == r}
        round_file = out / "rounds" / f"round_{r}.json"
        chosen = [tuple(h) for h in json.loads(round_file.read_text())["chosen"]] if round_file.exists() else []
        order += [(l, h, scores[(l, h)], r) for l, h in chosen]
        atomic_write_bytes(
            report / f"heatmap_round_{r}.png", heatmap_png(scores, num_layers, num_heads, f"round {r}", chosen)
        )
        status = "complete" if round_file.exists() else "in progress"
        lines.append(f"- Round {r} ({status}, {len(scores)} candidates scored): ![round {r}](heatmap_round_{r}.png)")
    lines += ["", "## Selected heads, in order", "", "| # | round | head (layer.head) | score |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {r} | {l}.{h} | {s:.4f} |" for i, (l, h, s, r) in enumerate(order)]
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
