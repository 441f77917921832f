"""
Paired statistics for per-image metrics: each configuration against a baseline, on the same prompt-seed pairs.

Images of one prompt are not independent (they share the prompt), so intervals resample *prompts*, keeping every
seed with its prompt (a cluster bootstrap, through `scipy.stats.bootstrap`), and the signed-rank test runs on the
per-prompt mean differences (`scipy.stats.wilcoxon`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats


def _clusters(prompts: Sequence[str], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt sums and counts of `values`, in first-seen prompt order."""
    index: dict[str, int] = {}
    sums: list[float] = []
    counts: list[int] = []
    for prompt, value in zip(prompts, values):
        if prompt not in index:
            index[prompt] = len(sums)
            sums.append(0.0)
            counts.append(0)
        sums[index[prompt]] += float(value)
        counts[index[prompt]] += 1
    return np.asarray(sums), np.asarray(counts, dtype=float)


def _ratio_of_sums(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    return sums.sum(axis=axis) / counts.sum(axis=axis)


def clustered_mean_ci(
    prompts: Sequence[str], values: Sequence[float], resamples: int = 9999, seed: int = 0
) -> dict[str, Any]:
    r"""
    Mean of `values` with a 95% interval that resamples prompts (seeds stay with their prompt).

    Args:
        prompts (`Sequence[str]`): The prompt of each value.
        values (`Sequence[float]`): One metric value per image.
        resamples (`int`, defaults to 9999): Bootstrap resamples.
        seed (`int`, defaults to 0): Random seed of the resampling.

    Returns:
        `{"mean", "ci95": [lo, hi], "prompts", "images"}`; the interval is `[mean, mean]` with a single prompt.
    """
    sums, counts = _clusters(prompts, values)
    mean = float(sums.sum() / counts.sum())
    if len(sums) < 2:
        return {"mean": mean, "ci95": [mean, mean], "prompts": len(sums), "images": int(counts.sum())}
    result = stats.bootstrap(
        (sums, counts),
        _ratio_of_sums,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=0.95,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return {"mean": mean, "ci95": [float(low), float(high)], "prompts": len(sums), "images": int(counts.sum())}


def _pair_keys(row: dict[str, Any]) -> list[tuple[str, Any]]:
    """`(prompt, seed)` per image; images without a known seed pair up by their order within the prompt."""
    seen: dict[str, int] = {}
    keys = []
    for prompt, seed in zip(row["prompts"], row["seeds"]):
        order = seen.get(prompt, 0)
        seen[prompt] = order + 1
        keys.append((prompt, seed if seed is not None else f"#{order}"))
    return keys


def paired_difference(
    baseline: dict[str, Any], other: dict[str, Any], metric: str, resamples: int = 9999, seed: int = 0
) -> dict[str, Any]:
    r"""
    `other - baseline` on the images both have (matched by prompt and seed).

    Args:
        baseline, other (`dict`): Rows of [`~headpag.eval.scoring.score_sets`] with `prompts`, `seeds` and
            `per_image[metric]`.
        metric (`str`): A per-image metric.
        resamples (`int`), seed (`int`): Bootstrap settings.

    Returns:
        `{"difference", "ci95", "p_wilcoxon", "win_rate", "pairs", "prompts"}`: the mean paired difference with a
        95% prompt-resampling interval, the Wilcoxon signed-rank p-value on per-prompt mean differences (1.0 when
        every difference is 0 or fewer than 2 prompts), and the share of pairs `other` wins (ties count half).

    Raises:
        `ValueError`: when the two rows share no prompt-seed pair.
    """
    ours = dict(zip(_pair_keys(other), other["per_image"][metric]))
    pairs = [
        (key[0], value, ours[key])
        for key, value in zip(_pair_keys(baseline), baseline["per_image"][metric])
        if key in ours
    ]
    if not pairs:
        raise ValueError(
            f"{other['name']!r} and {baseline['name']!r} share no prompt-seed pair: a paired comparison needs the "
            "same prompts and seeds."
        )
    prompts = [p for p, _, _ in pairs]
    diffs = np.asarray([b - a for _, a, b in pairs])
    interval = clustered_mean_ci(prompts, diffs, resamples, seed)
    sums, counts = _clusters(prompts, diffs)
    per_prompt = sums / counts
    if len(per_prompt) < 2 or np.all(per_prompt == 0):
        p_value = 1.0
    else:
        p_value = float(stats.wilcoxon(per_prompt, zero_method="zsplit").pvalue)
    win_rate = float(np.mean(np.where(diffs > 0, 1.0, np.where(diffs == 0, 0.5, 0.0))))
    return {
        "difference": interval["mean"],
        "ci95": interval["ci95"],
        "p_wilcoxon": p_value,
        "win_rate": win_rate,
        "pairs": len(pairs),
        "prompts": interval["prompts"],
    }


def paired_table(
    rows: Sequence[dict[str, Any]], metrics: Sequence[str], baseline: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    r"""
    Every configuration against `baseline` (default: the first row) for every per-image metric in `metrics`.

    Returns:
        `{"baseline": name, "comparisons": {name: {metric: paired_difference(...)}}}`.
    """
    if not rows:
        return {"baseline": None, "comparisons": {}}
    names = [r["name"] for r in rows]
    baseline = baseline or names[0]
    if baseline not in names:
        raise ValueError(f"Unknown baseline {baseline!r}; configurations: {', '.join(names)}.")
    base = rows[names.index(baseline)]
    comparisons = {
        r["name"]: {m: paired_difference(base, r, m, **kwargs) for m in metrics} for r in rows if r["name"] != baseline
    }
    return {"baseline": baseline, "comparisons": comparisons}
