"""Comparing two HeadHunter runs (e.g. exhaustive against successive halving): top-k overlap and Kendall's tau."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .records import mean_scores, pair_scores
from .rundir import RunDirectory


Head = tuple[int, int]


def _run(folder: Path) -> tuple[list[Head], dict[Head, float], int | None]:
    """`(selected heads in order, round-1 means of the heads scored on all pairs, M)` of a run folder."""
    run = RunDirectory(folder)
    meta = run.read_config()
    if meta is None:
        raise ValueError(f"{folder} holds no HeadHunter run (no config.json).")
    settings = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    num_pairs = run.num_pairs(meta)
    if num_pairs is None:
        raise ValueError(f"{folder}/config.json does not describe a search (its settings do not form one).")
    records = run.read_journal(meta["config_hash"], num_pairs=num_pairs)
    selected: list[Head] = []
    rounds = settings.get("rounds") if isinstance(settings.get("rounds"), int) else 1
    for r in range(rounds):
        parsed = run.read_round(r)
        if parsed is None:
            break
        selected += [h for h in parsed[1] if h not in selected]
    if not selected:
        raise ValueError(f"{folder} has no complete round yet: nothing selected to compare.")
    first = pair_scores(records, 0, num_pairs)
    full = {head: score for head, score in mean_scores(first).items() if len(first[head]) == num_pairs}
    return selected, full, num_pairs


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike) -> dict[str, Any]:
    r"""
    How far two runs agree.

    - Top-k overlap: `|A ∩ B| / k` of the selected heads (all rounds), `k` the larger of the two selections.
    - Kendall's tau (`scipy.stats.kendalltau`, tau-b) between the round-1 mean scores of the heads that **both** runs
      scored on all their pairs (for successive halving: the last stage's survivors); `nan` with fewer than 2.

    Args:
        run_a, run_b (`str`): Run folders.

    Returns:
        `dict`: `selected_a`, `selected_b`, `common`, `k`, `overlap`, `n_common` (heads in the tau), `tau`,
        `p_value`, `num_pairs_a`, `num_pairs_b`.

    Raises:
        `ValueError`: when a folder is no run or has no complete round.
    """
    sel_a, full_a, m_a = _run(Path(run_a))
    sel_b, full_b, m_b = _run(Path(run_b))
    k = max(len(sel_a), len(sel_b))
    common = [h for h in sel_a if h in set(sel_b)]
    both = sorted(set(full_a) & set(full_b))
    tau = p_value = math.nan
    if len(both) >= 2:
        from scipy.stats import kendalltau

        result = kendalltau([full_a[h] for h in both], [full_b[h] for h in both])
        tau, p_value = float(result.statistic), float(result.pvalue)
    return {
        "selected_a": sel_a,
        "selected_b": sel_b,
        "common": common,
        "k": k,
        "overlap": len(common) / k,
        "n_common": len(both),
        "tau": tau,
        "p_value": p_value,
        "num_pairs_a": m_a,
        "num_pairs_b": m_b,
    }


def format_comparison(run_a: str | os.PathLike, run_b: str | os.PathLike, result: dict[str, Any]) -> str:
    """The lines `headpag hunt --compare` prints."""

    def heads(items: list[Head]) -> str:
        return ", ".join(f"{l}.{h}" for l, h in items) or "none"

    return "\n".join(
        [
            f"HeadHunter compare: A = {run_a}, B = {run_b}",
            f"  selected A: {heads(result['selected_a'])}",
            f"  selected B: {heads(result['selected_b'])}",
            f"  top-k overlap |A & B| / k = {len(result['common'])}/{result['k']} = {result['overlap']:.3f}",
            f"  Kendall's tau (round 1, {result['n_common']} heads both runs scored on all pairs): "
            f"{result['tau']:.3f} (p = {result['p_value']:.3g})",
        ]
    )
