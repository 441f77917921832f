"""
HeadHunter strategies on a tiny SD3 of 8 layers x 8 heads (64 candidates) with a planted head: exhaustive and
successive halving both find it, halving's row-evaluations (counted here with forward pre-hooks, independently of the
hunter) are at most a third, resume after SIGKILL inside a halving stage re-scores nothing, `--compare` reports.

Also a worker: `python test_strategies.py OUTPUT_DIR [delay]` runs the halving search that the kill test kills.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hunt_worker import brightness

from headpag import HeadSet, load_pipeline
from headpag.models.tiny import tiny_sd3_components
from headpag.pipelines.sd3 import StableDiffusion3HeadPAGPipeline
from headpag.search import HeadHunter, SearchConfig, compare_runs, read_journal, write_report
from headpag.search.journal import scan_journal
from headpag.search.records import check_record
from headpag.search.rundir import RunDirectory
from headpag.search.strategies import exhaustive, halving_schedule, head_hunter, successive_halving


HERE = Path(__file__).parent
PLANTED = (5, 3)
SMALL = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16)
SETTINGS = dict(
    prompts=[f"a photo of object {c}" for c in "abcdefghi"], seeds=list(range(9)), rounds=1, top_k=1, **SMALL
)
PROXY = dict(proxy_size=16, proxy_steps=1)  # 16 x 16: a quarter of the image tokens of 32 x 32; 1 step of 2
# The kill test: tiny-sd3 (16 heads), stages of 16 x 1, 6 x 2 and 2 x 6 images (40 images, 16 + 6 + 2 records).
KILL = dict(
    prompts=["a cat", "a dog", "a car"], seeds=[0, 1, 2], pairing="product", rounds=1, top_k=1, batch_size=2,
    strategy="halving", **SMALL,
)  # fmt: skip


class Rows:
    r"""
    The test's own count of transformer rows, independent of the hunter's: a forward pre-hook on the transformer, put
    first, sees each call's clean rows; one on its last block sees the clean and the perturbed rows of the same call
    in one batch (head-PAG appends the perturbed copies inside the transformer; prefix sharing never reaches the last
    block).
    """

    def __init__(self, transformer, reference_tokens: int = 64):
        self.transformer = transformer
        self.clean = 0
        self.all = 0
        self.reference_tokens = reference_tokens
        self.weighted = 0.0  # rows weighted by their image tokens relative to `reference_tokens`

    @staticmethod
    def _rows(args, kwargs) -> int:
        return kwargs.get("hidden_states", args[0] if args else None).shape[0]

    def _on_transformer(self, module, args, kwargs):
        self.clean += self._rows(args, kwargs)

    def _on_last_block(self, module, args, kwargs):
        self.all += self._rows(args, kwargs)
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (rows, image tokens, dim)
        self.weighted += hidden.shape[0] * hidden.shape[1] / self.reference_tokens

    def __enter__(self) -> Rows:
        self.handles = [
            # prepend: before head-PAG's own pre-hook appends the perturbed copies
            self.transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True, prepend=True),
            self.transformer.transformer_blocks[-1].register_forward_pre_hook(self._on_last_block, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def counting(objective, calls: list[int]):
    def wrapped(images, prompts):
        calls.append(len(images))
        return objective(images, prompts)

    return wrapped


@pytest.fixture(scope="module")
def big():
    """A tiny SD3 with 8 layers x 8 heads."""
    torch.manual_seed(0)
    pipe = StableDiffusion3HeadPAGPipeline(**tiny_sd3_components(num_layers=8, num_heads=8))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def planted(big, tmp_path_factory):
    """
    Rewards closeness to the images rendered with the hidden head `PLANTED` alone (rendered once, here): at the
    configured size, and at the proxy fidelity of `PROXY` (told apart by their size), so that the planted head is the
    best at both fidelities (how well a proxy ranks heads on a real model is another matter: this tests the search).
    """
    config = SearchConfig(**SETTINGS, strategy="halving", **PROXY)
    maker = HeadHunter(big, lambda i, p: [0.0] * len(i), config, tmp_path_factory.mktemp("refs") / "unused")
    refs = {}
    for proxy in (False, True):
        images = maker.generate([(HeadSet([PLANTED]), p, s) for p, s in config.pairs()], proxy=proxy)
        refs.update({(p, im.size): np.asarray(im, np.float32) for (p, _), im in zip(config.pairs(), images)})

    def objective(images, prompts):
        return [-float(np.abs(np.asarray(im, np.float32) - refs[p, im.size]).mean()) for im, p in zip(images, prompts)]

    return objective


@pytest.fixture(scope="module")
def runs(big, planted, tmp_path_factory):
    """Both strategies on the 64-head model, with the test's own counts: `{strategy: dict}`."""
    root = tmp_path_factory.mktemp("strategies")
    out = {}
    for strategy in ("exhaustive", "halving"):
        calls: list[int] = []
        config = SearchConfig(**SETTINGS, batch_size=32, strategy=strategy)
        hunter = HeadHunter(big, counting(planted, calls), config, root / strategy)
        with Rows(big.transformer) as rows:
            began = time.perf_counter()
            result = hunter.run()
            seconds = time.perf_counter() - began
        out[strategy] = dict(result=result, rows=rows, images=sum(calls), seconds=seconds, dir=root / strategy)
    return out


# ---------------------------------------------------------------------------------------------------- end to end
def test_both_strategies_recover_the_planted_head(runs):
    for strategy in ("exhaustive", "halving"):
        result = runs[strategy]["result"]
        assert result.order == [PLANTED], strategy
        assert result.rounds[0]["chosen"] == [PLANTED]
    full, halving = runs["exhaustive"]["result"].rounds[0], runs["halving"]["result"].rounds[0]
    assert len(full["stages"]) == 1 and full["stages"][0]["dropped"] == [] and len(full["scores"]) == 64
    # Successive halving: 64 heads on 1 pair, the best 22 on 3 pairs, the best 8 on all 9.
    stages = halving["stages"]
    assert [(len(s["candidates"]), s["pairs"]) for s in stages] == [
        (64, [0]),
        (22, [1, 2]),
        (8, [3, 4, 5, 6, 7, 8]),
    ]
    assert [len(s["dropped"]) for s in stages] == [42, 14, 0]
    assert PLANTED in stages[-1]["candidates"]
    assert sorted(halving["pairs_scored"].values()) == [1] * 42 + [3] * 14 + [9] * 8
    # A score on a pair never depends on the stage (nor the strategy) that computed it: same images up to uint8
    # rounding between batch compositions.
    for head in stages[-1]["candidates"]:
        assert halving["scores"][head] == pytest.approx(full["scores"][head], abs=0.05)


def test_halving_costs_at_most_a_third_and_the_cost_is_counted_exactly(runs):
    ex, hv = runs["exhaustive"], runs["halving"]
    for run in (ex, hv):
        rows = run["rows"]
        assert rows.all == 2 * rows.clean  # no CFG: every clean row gets one perturbed copy
        cost = run["result"].cost
        assert cost["row_evals"] == pytest.approx(rows.all)  # the hunter's count matches the test's
        assert cost["images"] == run["images"]
        assert 0 < cost["seconds"] <= run["seconds"]
    assert ex["images"] == 64 * 9 and ex["rows"].all == 64 * 9 * 2 * 2  # images x steps x (clean + perturbed)
    assert hv["images"] == 64 * 1 + 22 * 2 + 8 * 6
    ratio = hv["rows"].all / ex["rows"].all
    print(
        f"\nrow-evaluations halving/exhaustive = {hv['rows'].all}/{ex['rows'].all} = {ratio:.3f}; "
        f"wall time {hv['seconds']:.2f}s/{ex['seconds']:.2f}s = {hv['seconds'] / ex['seconds']:.3f}"
    )
    assert ratio <= 1 / 3
    # The journal holds the cost too (summed by the report), and each round's.
    for run in (ex, hv):
        records = read_journal(run["dir"] / "journal.jsonl")
        assert sum(r["cost"]["row_evals"] for r in records) == pytest.approx(run["rows"].all)
        assert run["result"].rounds[0]["cost"] == run["result"].cost


@pytest.fixture(scope="module")
def proxy_run(big, planted, tmp_path_factory):
    """Halving with its early stages at the proxy fidelity, on the 64-head model, with the test's own counts."""
    out = tmp_path_factory.mktemp("proxy") / "run"
    calls: list[int] = []
    config = SearchConfig(**SETTINGS, batch_size=32, strategy="halving", **PROXY)
    hunter = HeadHunter(big, counting(planted, calls), config, out)
    with Rows(big.transformer) as rows:
        result = hunter.run()
    return dict(result=result, rows=rows, images=sum(calls), dir=out, config=config)


def test_halving_with_a_proxy_recovers_the_planted_head_for_less(runs, proxy_run, big, planted):
    result, rows = proxy_run["result"], proxy_run["rows"]
    assert result.order == [PLANTED]
    stages = result.rounds[0]["stages"]
    # The same schedule as halving; the proxy stages at 16 x 16 and 1 step, the last stage at full fidelity on all 9
    # pairs: its survivors' proxy scores are not reused, so it renders every pair for them anew.
    assert [(len(s["candidates"]), s["pairs"]) for s in stages] == [(64, [0]), (22, [1, 2]), (8, list(range(9)))]
    assert sorted(result.rounds[0]["pairs_scored"].values()) == [1] * 42 + [3] * 14 + [9] * 8
    assert proxy_run["images"] == 64 * 1 + 22 * 2 + 8 * 9
    # The test's own count: proxy rows weigh 1/4 (16 of 64 image tokens) and run 1 step; full rows 2 steps.
    assert rows.all == 2 * rows.clean == (64 + 44) * 1 * 2 + 72 * 2 * 2
    assert rows.weighted == pytest.approx((64 + 44) * 1 * 2 / 4 + 72 * 2 * 2)
    assert result.cost["row_evals"] == pytest.approx(rows.weighted)
    halving = runs["halving"]["rows"]
    assert halving.weighted == pytest.approx(halving.all)  # every halving row is at the configured size
    ratio = rows.weighted / halving.weighted
    print(f"\nweighted row-evaluations halving+proxy/halving = {rows.weighted:g}/{halving.weighted:g} = {ratio:.3f}")
    assert ratio < 0.6
    # Journal records say their fidelity; the final stage's scores are full-fidelity scores (the exhaustive ones).
    records = read_journal(proxy_run["dir"] / "journal.jsonl")
    fidelity = {r["stage"]: r["fidelity"] for r in records}
    assert fidelity == {
        0: {"proxy": True, "height": 16, "width": 16, "steps": 1},
        1: {"proxy": True, "height": 16, "width": 16, "steps": 1},
        2: {"proxy": False, "height": 32, "width": 32, "steps": 2},
    }
    full = runs["exhaustive"]["result"].rounds[0]["scores"]
    for head in stages[-1]["candidates"]:
        assert result.rounds[0]["scores"][head] == pytest.approx(full[head], abs=0.05)
    # Resuming re-renders nothing: from the round file, and from the journal (each fidelity's scores apart).
    calls: list[int] = []
    again = HeadHunter(big, counting(planted, calls), proxy_run["config"], proxy_run["dir"]).run()
    assert again.order == [PLANTED] and calls == []
    (proxy_run["dir"] / "rounds" / "round_0.json").unlink()
    again = HeadHunter(big, counting(planted, calls), proxy_run["config"], proxy_run["dir"]).run()
    assert again.order == [PLANTED] and calls == [] and again.rounds[0]["scores"] == result.rounds[0]["scores"]
    readme = (write_report(proxy_run["dir"]) / "README.md").read_text()
    assert "stage 0 (1 pair, proxy 16x16, 1 steps): 64 candidates; 42 dropped" in readme
    assert "stage 2 (9 pairs): 8 candidates; chosen: 5.3" in readme


def test_proxy_settings_are_checked_and_hashed_only_when_set():
    base = dict(prompts=["a cat", "a dog"], seeds=[0, 1], strategy="halving")
    plain = SearchConfig(**base)
    assert "proxy_size" not in plain.to_dict() and "proxy_steps" not in plain.to_dict()
    hashes = {SearchConfig(**base, **extra).config_hash() for extra in ({}, {"proxy_size": 16}, {"proxy_steps": 1})}
    assert len(hashes) == 3
    config = SearchConfig(**base, proxy_steps=3)
    assert config.to_dict()["proxy_steps"] == 3 and SearchConfig.from_dict(config.to_dict()) == config
    assert config.fidelity(proxy=True) == {"height": 1024, "width": 1024, "steps": 3}
    for bad, message in (
        ({"proxy_size": 0}, "proxy_size must be an integer >= 1"),
        ({"proxy_steps": 1.5}, "proxy_steps must be an integer >= 1"),
        ({"proxy_size": 16, "strategy": "exhaustive"}, "apply to strategy='halving'"),
    ):
        with pytest.raises(ValueError, match=message):
            SearchConfig(**{**base, **bad})
    from headpag.cli import build_parser
    from headpag.cli.hunt import build_config

    args = ["hunt", "--prompts", "x", "--strategy", "halving", "--proxy-size", "512", "--proxy-steps", "8"]
    config = build_config(build_parser().parse_args(args), "sd3")
    assert (config.proxy_size, config.proxy_steps) == (512, 8)


def test_report_shows_dropped_candidates_per_stage_and_the_cost(runs):
    readme = (write_report(runs["halving"]["dir"]) / "README.md").read_text()
    dropped = runs["halving"]["result"].rounds[0]["stages"][0]["dropped"]
    line = next(x for x in readme.splitlines() if "stage 0 (1 pair): 64 candidates; 42 dropped: " in x)
    assert all(f"{l}.{h}" in line.split(": ", 2)[2].split(", ") for l, h in dropped)
    assert "stage 1 (3 pairs): 22 candidates; 14 dropped:" in readme
    assert f"stage 2 (9 pairs): 8 candidates; chosen: {PLANTED[0]}.{PLANTED[1]}" in readme
    hv = runs["halving"]["result"].cost
    assert "## Cost" in readme and f"{hv['row_evals']:g} row-evaluations, {hv['images']:g} images" in readme
    # Ranked for `top_k` sweeps over a search run: the heads scored on all pairs first, best first.
    final = runs["halving"]["result"].rounds[0]["stages"][-1]["candidates"]
    scores = runs["halving"]["result"].rounds[0]["scores"]
    assert RunDirectory(runs["halving"]["dir"]).ranked_heads()[:8] == sorted(final, key=lambda h: (-scores[h], h))
    readme = (write_report(runs["exhaustive"]["dir"]) / "README.md").read_text()
    assert "stage 0 (9 pairs): 64 candidates; chosen: 5.3" in readme and "2304 row-evaluations" in readme


def test_compare_prints_overlap_and_tau(runs, capsys):
    from headpag.cli import main

    a, b = str(runs["exhaustive"]["dir"]), str(runs["halving"]["dir"])
    assert main(["hunt", "--compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "top-k overlap |A & B| / k = 1/1 = 1.000" in out
    assert "Kendall's tau (round 1, 8 heads both runs scored on all pairs): " in out
    result = compare_runs(a, b)
    assert result["overlap"] == 1.0 and result["n_common"] == 8
    assert result["tau"] > 0.5 and f"{result['tau']:.3f}" in out
    assert compare_runs(a, a)["tau"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "model, extra, rows_per_image_step",
    [
        ("tiny-sd3", {}, 2),  # clean + perturbed
        ("tiny-sd3", {"guidance_scale": 4.0}, 3),  # [uncond, cond] + perturbed cond
        ("tiny-flux", {}, 2),  # cond + perturbed
        ("tiny-flux", {"true_cfg_scale": 3.0, "negative_prompt": "ugly"}, 3),  # + the uncond call
    ],
)
def test_row_counter_follows_each_batch_layout(model, extra, rows_per_image_step, tmp_path):
    from headpag.search.cost import RowCounter

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    config = SearchConfig(prompts=["a cat", "a dog"], seeds=[0], **{**SMALL, "num_inference_steps": 3}, **extra)
    maker = HeadHunter(pipe, lambda i, p: [0.0] * len(i), config, tmp_path / "unused")
    last = (
        pipe.transformer.transformer_blocks[-1]
        if model == "tiny-sd3"
        else pipe.transformer.single_transformer_blocks[-1]
    )
    seen: list[int] = []
    handle = last.register_forward_pre_hook(lambda m, a, k: seen.append(Rows._rows(a, k)), with_kwargs=True)
    counter = RowCounter(pipe, config.height, config.width)
    try:
        maker.generate([(HeadSet([(1, 1)]), p, s) for p, s in config.pairs()], counter=counter)
    finally:
        handle.remove()
    assert counter.rows == sum(seen) == 2 * 3 * rows_per_image_step
    # Only what runs inside the counter's block counts.
    maker.generate([(HeadSet([(1, 1)]), "a cat", 0)])
    assert counter.rows == 2 * 3 * rows_per_image_step


# ---------------------------------------------------------------------------------------------------- resume
def hunter(output_dir, objective):
    pipe = load_pipeline("tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    return HeadHunter(pipe, objective, SearchConfig(**KILL), output_dir, model_name="tiny-sd3")


def test_resume_after_sigkill_in_a_halving_stage_rescores_nothing(tmp_path, caplog):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), str(run), "0.25"], cwd=HERE)
    journal = run / "journal.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not any(r.get("stage", 0) >= 1 for r in read_journal(journal)):
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = read_journal(journal)
    stages = [r.get("stage", 0) for r in before]
    assert stages.count(0) == 16 and 1 <= stages.count(1) < 6 and 2 not in stages, "the kill must land in stage 1"
    done_images = sum(len(r["scores"]) for r in before)
    done_rows = sum(r["cost"]["row_evals"] for r in before)

    calls: list[int] = []
    resumed_hunter = hunter(run, counting(brightness, calls))
    with Rows(resumed_hunter.pipe.transformer) as rows:
        resumed = resumed_hunter.run()
    reference = hunter(tmp_path / "reference", brightness).run()
    assert resumed.order == reference.order
    assert resumed.rounds[0]["scores"] == pytest.approx(reference.rounds[0]["scores"])
    assert resumed.rounds[0]["stages"] == reference.rounds[0]["stages"]
    assert sum(calls) == 40 - done_images  # nothing that finished before the kill was rendered again
    records = read_journal(journal)
    keys = [(r["round"], r["layer"], r["head"], r.get("stage", 0)) for r in records]
    assert len(keys) == len(set(keys)) == 16 + 6 + 2
    # The run's cost includes the work before the kill: the same as an uninterrupted run's.
    assert rows.all == pytest.approx(resumed.cost["row_evals"] - done_rows)
    assert resumed.cost["row_evals"] == reference.cost["row_evals"] == 40 * 2 * 2
    assert resumed.cost["images"] == reference.cost["images"] == 40
    # A finished run resumes to the same result without rendering anything, from its round file or, when that does
    # not follow the schedule, from the journal.
    calls.clear()
    assert hunter(run, counting(brightness, calls)).run().order == reference.order and calls == []
    round_file = run / "rounds" / "round_0.json"
    doc = json.loads(round_file.read_text())
    doc["stages"][1]["candidates"].pop()
    round_file.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="headpag"):
        again = hunter(run, counting(brightness, calls)).run()
    assert again.order == reference.order and again.cost == resumed.cost and calls == []
    assert any("stage 1 does not follow the halving schedule" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------- settings
def test_strategy_is_part_of_the_settings_hash(tmp_path):
    # Exhaustive runs keep the hashes they had before the strategies existed; halving settings do not change them.
    assert SearchConfig(prompts=["x"]).config_hash() == "63f9d2fd4a0f4b16"
    old = dict(prompts=["a cat", "a dog"], seeds=[0, 1], rounds=2, top_k=2, pool="0-1")
    assert SearchConfig(**old).config_hash("tiny-sd3") == "3fdd19f7b9519ddb"
    assert SearchConfig(**old, halving_eta=5).config_hash("tiny-sd3") == "3fdd19f7b9519ddb"
    hashes = {
        SearchConfig(**old, **extra).config_hash("tiny-sd3")
        for extra in (
            {},
            {"strategy": "halving"},
            {"strategy": "halving", "halving_eta": 2},
            {"strategy": "halving", "halving_min_pairs": 2},
        )
    }
    assert len(hashes) == 4
    for bad, message in (
        ({"strategy": "random"}, "strategy must be one of"),
        ({"halving_eta": 1}, "halving_eta must be an integer >= 2"),
        ({"halving_min_pairs": 0}, "halving_min_pairs must be an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            SearchConfig(prompts=["x"], **bad)
    # A run folder of another strategy is refused like any other settings change.
    pipe = load_pipeline("tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    settings = dict(prompts=["a cat"], seeds=[0, 1], pairing="product", top_k=1, pool="0.0-1", **SMALL)
    HeadHunter(pipe, brightness, SearchConfig(**settings), tmp_path).run()
    with pytest.raises(ValueError, match="different settings"):
        HeadHunter(pipe, brightness, SearchConfig(**settings, strategy="halving"), tmp_path)


def test_cli_flags_build_the_strategy():
    from headpag.cli import build_parser
    from headpag.cli.hunt import build_config

    args = build_parser().parse_args(
        ["hunt", "--model", "tiny-sd3", "--prompts", "a cat", "--strategy", "halving", "--halving-min-pairs", "2"]
        + ["--halving-eta", "4"]
    )
    config = build_config(args, "sd3")
    assert (config.strategy, config.halving_min_pairs, config.halving_eta) == ("halving", 2, 4)
    assert build_config(build_parser().parse_args(["hunt", "--prompts", "x"]), "sd3").strategy == "exhaustive"


# ---------------------------------------------------------------------------------------------------- the functions
def synthetic(values: dict, asked: list):
    """`score(candidates, pairs)` from a table `values[head][pair]`, recording what was asked."""

    def score(candidates, pairs):
        asked.append((list(candidates), list(pairs)))
        return {c: [values[c][j] for j in pairs] for c in candidates}

    return score


def test_successive_halving_schedule_ties_and_degenerate_cases():
    heads = [(l, h) for l in range(3) for h in range(5)]  # 15 candidates
    rng = np.random.default_rng(0)
    values = {c: list(rng.normal(size=10)) for c in heads}
    asked: list = []
    outcome = successive_halving(synthetic(values, asked), heads, 10, 2, min_pairs=1, eta=3)
    # 15 on pair 0; the best 5 on pairs 1-2; the best 2 on pairs 3-8; the 2 left on pair 9; each pair asked once.
    assert [(len(c), p) for c, p in asked] == [(15, [0]), (5, [1, 2]), (2, [3, 4, 5, 6, 7, 8]), (2, [9])]
    assert [(s.candidates, s.pairs[-1] + 1) for s in halving_schedule(15, 10, 2)] == [(15, 1), (5, 3), (2, 9), (2, 10)]
    proxy = halving_schedule(15, 10, 2, proxy=True)  # the last stage renders all pairs anew at full fidelity
    assert [(s.candidates, s.pairs, s.proxy) for s in proxy][-1] == (2, list(range(10)), False)
    assert all(s.proxy for s in proxy[:-1])
    first = {c: values[c][0] for c in heads}
    assert sorted(asked[1][0]) == sorted(sorted(first, key=lambda c: (-first[c], c))[:5])
    assert outcome.chosen == sorted(asked[3][0], key=lambda c: (-np.mean(values[c]), c))
    assert outcome.dropped_at() == {**{c: 0 for c in heads if c not in asked[1][0]}, **{
        c: 1 for c in asked[1][0] if c not in asked[2][0]
    }}  # fmt: skip
    # Ties break by (layer, head) at every stage.
    flat = {c: [1.0] * 10 for c in heads}
    tied = successive_halving(synthetic(flat, []), heads, 10, 2)
    assert [s.candidates for s in tied.stages][1] == heads[:5] and tied.chosen == heads[:2]
    # min_pairs >= M is the exhaustive round, with the same scores.
    asked.clear()
    one = successive_halving(synthetic(values, asked), heads, 10, 3, min_pairs=10)
    full = exhaustive(synthetic(values, []), heads, 10, 3)
    assert len(asked) == 1 and one.chosen == full.chosen and one.scores == full.scores
    # A pool smaller than k is chosen whole.
    assert sorted(successive_halving(synthetic(values, []), heads[:2], 10, 5).chosen) == heads[:2]
    with pytest.raises(ValueError, match="eta >= 2"):
        successive_halving(synthetic(values, []), heads, 10, 2, eta=1)


def test_algorithm_1_is_a_function_of_score():
    heads = [(0, h) for h in range(6)]
    bonus = {(0, 4): 3.0, (0, 1): 2.0, (0, 5): 1.0}

    def score_for(r, selected):
        def score(candidates, pairs):  # a head is worth its bonus, less when a better one is already selected
            return {c: [bonus.get(c, 0.0) - 0.1 * len(selected) + 0.01 * j for j in pairs] for c in candidates}

        return score

    seen = []
    outcomes = head_hunter(score_for, heads, 3, 1, 4, on_round=lambda r, s, o: seen.append((r, s, o.chosen)))
    assert [o.chosen for o in outcomes] == [[(0, 4)], [(0, 1)], [(0, 5)]]
    assert seen == [(0, [], [(0, 4)]), (1, [(0, 4)], [(0, 1)]), (2, [(0, 4), (0, 1)], [(0, 5)])]
    assert len(head_hunter(score_for, heads[:2], 5, 1, 4)) == 2  # the pool runs out


def test_journal_checks_the_stage_fields(tmp_path):
    ok = dict(round=0, layer=0, head=0, score=1.0, scores=[1.0, 1.0], stage=1, pairs=[1, 2])
    assert check_record(ok, num_pairs=3) is None
    assert check_record({**ok, "cost": {"row_evals": 4.0, "images": 1, "seconds": 0.1}}) is None
    for bad, why in (
        ({"stage": -1}, "stage must be an int >= 0"),
        ({"pairs": [1, 1]}, "pairs must be a list of distinct ints"),
        ({"pairs": [1]}, "pairs name 1 pairs but scores hold 2"),
        ({"pairs": [1, 3]}, "name a pair the run lacks"),
        ({"cost": {"row_evals": float("nan")}}, "cost 'row_evals' must be a finite number >= 0"),
        ({"cost": [1]}, "cost must be a JSON object"),
    ):
        assert why in (check_record({**ok, **bad}, num_pairs=3) or ""), (bad, why)
    no_pairs = {k: v for k, v in ok.items() if k != "pairs"}
    assert "scores hold 2 scores but the run has 3 pairs" in check_record(no_pairs, num_pairs=3)
    assert check_record({**no_pairs, "scores": [1.0]}) is None
    # Records of one head in one round differ by stage; a second record of the same stage is a duplicate.
    path = tmp_path / "journal.jsonl"
    path.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in (
                {**ok, "stage": 0, "pairs": [0], "scores": [1.0]},
                ok,
                {**ok, "score": 9.0},
            )
        )
    )
    records, problems = scan_journal(path, num_pairs=3)
    assert [r["stage"] for r in records] == [0, 1]
    assert len(problems) == 1 and "duplicate of line 2 (round 0, head 0.0, stage 1)" in problems[0]
    assert not math.isnan(records[1]["score"])


if __name__ == "__main__":  # the worker of the kill test
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    hunter(sys.argv[1], lambda i, p: brightness(i, p, delay)).run()
