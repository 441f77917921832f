"""Paired statistics: prompt-clustered bootstrap intervals, Wilcoxon on per-prompt differences, win rates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from headpag.eval.paired import clustered_mean_ci, paired_difference, paired_table


def rows(seed=0, prompts=12, seeds=5, effect=0.3):
    """Two configurations on the same prompt-seed pairs; prompts differ a lot (a strong cluster effect)."""
    rng = np.random.default_rng(seed)
    prompt_effect = rng.normal(0, 3, prompts)
    prompt_gain = effect + rng.normal(0, 0.5, prompts)
    names, seed_list, base, other = [], [], [], []
    for p in range(prompts):
        for s in range(seeds):
            noise = rng.normal(0, 0.2)
            names.append(f"prompt {p}")
            seed_list.append(s)
            base.append(prompt_effect[p] + noise)
            other.append(prompt_effect[p] + prompt_gain[p] + noise + rng.normal(0, 0.2))
    make = lambda name, values: {"name": name, "prompts": names, "seeds": seed_list, "per_image": {"m": values}}  # noqa: E731
    return make("base", base), make("other", other)


def explicit_prompt_bootstrap(prompts, values, resamples=4000, seed=1):
    """Resample prompts with replacement (all of a prompt's images together); percentile interval of the mean."""
    groups = {}
    for p, v in zip(prompts, values):
        groups.setdefault(p, []).append(v)
    clusters = list(groups.values())
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        pick = rng.integers(0, len(clusters), len(clusters))
        chosen = [v for i in pick for v in clusters[i]]
        means.append(np.mean(chosen))
    return np.percentile(means, [2.5, 97.5])


def test_paired_difference_matches_an_explicit_prompt_resampling_loop():
    base, other = rows()
    result = paired_difference(base, other, "m")
    diffs = np.asarray(other["per_image"]["m"]) - np.asarray(base["per_image"]["m"])
    assert result["difference"] == pytest.approx(diffs.mean(), abs=1e-12)
    lo, hi = explicit_prompt_bootstrap(base["prompts"], diffs)
    width = hi - lo
    assert result["ci95"][0] == pytest.approx(lo, abs=0.1 * width)
    assert result["ci95"][1] == pytest.approx(hi, abs=0.1 * width)
    per_prompt = diffs.reshape(12, 5).mean(axis=1)
    assert result["p_wilcoxon"] == pytest.approx(stats.wilcoxon(per_prompt).pvalue)
    assert result["win_rate"] == pytest.approx(np.mean(diffs > 0))
    assert (result["pairs"], result["prompts"]) == (60, 12)


def test_seeds_stay_with_their_prompt():
    """The clustered interval is wider than an i.i.d. one when prompts differ: seeds are never split."""
    base, _ = rows(effect=0.0)
    clustered = clustered_mean_ci(base["prompts"], base["per_image"]["m"])
    iid = stats.bootstrap(
        (np.asarray(base["per_image"]["m"]),), np.mean, random_state=np.random.default_rng(0), method="percentile"
    ).confidence_interval
    assert clustered["ci95"][1] - clustered["ci95"][0] > 1.8 * (iid.high - iid.low)
    lo, hi = explicit_prompt_bootstrap(base["prompts"], base["per_image"]["m"])
    assert clustered["ci95"][0] == pytest.approx(lo, abs=0.1 * (hi - lo))


def test_pairs_are_matched_by_prompt_and_seed_and_table_uses_the_first_row():
    base, other = rows(prompts=3, seeds=2)
    shuffled = {k: (v[::-1] if k != "per_image" else {"m": v["m"][::-1]}) for k, v in other.items() if k != "name"}
    shuffled["name"] = "shuffled"
    assert paired_difference(base, shuffled, "m")["difference"] == pytest.approx(
        paired_difference(base, other, "m")["difference"]
    )
    table = paired_table([base, other, shuffled], ["m"])
    assert table["baseline"] == "base" and set(table["comparisons"]) == {"other", "shuffled"}
    with pytest.raises(ValueError, match="share no prompt-seed pair"):
        paired_difference(base, {**other, "prompts": ["x"] * 6}, "m")
    with pytest.raises(ValueError, match="Unknown baseline 'nope'"):
        paired_table([base, other], ["m"], baseline="nope")
    same = paired_difference(base, base, "m")
    assert same["p_wilcoxon"] == 1.0 and same["win_rate"] == 0.5 and same["difference"] == 0.0


def test_report_puts_the_paired_table_first(tmp_path):
    import json

    from PIL import Image

    from headpag.eval.report import write_eval_report

    base, other = rows(prompts=4, seeds=2)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    for row in (base, other):
        row.update(options="", count=8, images=[str(image)] * 8)
        row["metrics"] = {"m": clustered_mean_ci(row["prompts"], row["per_image"]["m"])}
    report = write_eval_report(tmp_path / "r", [base, other], {}).read_text()
    assert report.index("## Against `base`") < report.index("## Per configuration")
    assert "| other | +" in report and "p=" in report and "wins" in report
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["paired"]["comparisons"]["other"]["m"]["pairs"] == 8


def test_grids_are_labelled_and_downscaled():
    from PIL import Image

    from headpag.eval.grids import image_grid

    big = [[Image.new("RGB", (1024, 512), (200, 0, 0)), Image.new("RGB", (1024, 512))] for _ in range(3)]
    grid = image_grid(big, column_labels=["a", "b"], row_labels=["p0 (seed 0)", "p1 (seed 0)", "p2 (seed 0)"])
    left = grid.size[0] - 2 * 256
    assert left > 0 and grid.size[1] == 16 + 3 * 128  # 256 x 128 tiles, labels on top and on the left
    assert grid.getpixel((left + 10, 16 + 10)) == (200, 0, 0)
    full = image_grid(big, cell=None)
    assert full.size == (2048, 1536)
