"""HeadHunter end to end on tiny SD3 and FLUX: planted heads, ties, batching, resume after SIGKILL, 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_clip_checkpoint
from hunt_worker import CONFIG, brightness, hunter

from headpag import HeadSet, load_pipeline
from headpag.search import HeadHunter, SearchConfig, preset, read_journal


HERE = Path(__file__).parent
SMALL = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16)


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def pipe(request):
    p = load_pipeline(request.param)
    p.set_progress_bar_config(disable=True)
    return p


def planted_objective(pipe, config, targets, tmp_path):
    """Rewards images closest to those made with `targets[0]`, then with `targets[0] + targets[1]`, ..."""
    maker = HeadHunter(pipe, lambda i, p: [0.0] * len(i), config, tmp_path / "refs")
    refs = []
    for n in range(1, len(targets) + 1):
        images = maker.generate([(HeadSet(targets[:n]), p, s) for p, s in config.pairs()])
        refs.append({p: np.asarray(im, np.float32) for (p, _), im in zip(config.pairs(), images)})

    def objective(images, prompts):
        return [
            -min(np.abs(np.asarray(im, np.float32) - ref[p]).mean() for ref in refs) for im, p in zip(images, prompts)
        ]

    return objective


def test_search_finds_planted_heads(pipe, tmp_path):
    config = SearchConfig(prompts=["a cat", "a dog"], seeds=[0, 1], rounds=3, top_k=1, batch_size=5, **SMALL)
    targets = [(2, 1), (0, 3), (3, 0)] if pipe.transformer.config.get("num_layers") == 4 else [(2, 1), (0, 1), (3, 0)]
    objective = planted_objective(pipe, config, targets, tmp_path)
    result = HeadHunter(pipe, objective, config, tmp_path / "run").run()
    assert result.order == targets
    assert result.selected == HeadSet(targets)
    assert [r["chosen"] for r in result.rounds] == [[t] for t in targets]
    saved = HeadSet.load(tmp_path / "run" / "selected_heads.json")
    assert saved == HeadSet(targets) and saved.metadata["provenance"]["order"] == [list(t) for t in targets]
    result.save_heads(tmp_path / "heads.json")
    assert HeadSet.load(tmp_path / "heads.json") == HeadSet(targets)


def test_ties_break_by_layer_then_head(tmp_path):
    pipe = load_pipeline("tiny-sd3")
    config = SearchConfig(prompts=["a cat"], seeds=[0], rounds=2, top_k=3, pool="1, 0.2-3", **SMALL)
    result = HeadHunter(pipe, lambda images, prompts: [1.0] * len(images), config, tmp_path).run()
    assert result.order == [(0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]


def test_batched_equals_one_at_a_time(pipe, tmp_path):
    config = SearchConfig(prompts=["a cat", "a dog"], seeds=[3, 4], **SMALL)
    h = HeadHunter(pipe, lambda i, p: [0.0] * len(i), config, tmp_path)
    items = [(HeadSet([(l, h_)]), p, s) for l, h_ in [(0, 1), (3, 0), (1, 1)] for p, s in config.pairs()]
    together = h.generate(items, output_type="latent")
    for i, item in enumerate(items):
        alone = h.generate([item], output_type="latent")
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-4, rtol=0)
    runs = [
        HeadHunter(
            pipe,
            brightness,
            SearchConfig(prompts=["a cat", "a dog"], seeds=[3, 4], rounds=2, top_k=2, batch_size=b, **SMALL),
            tmp_path / f"b{b}",
        ).run()
        for b in (1, 7)
    ]
    assert runs[0].order == runs[1].order
    for a, b in zip(runs[0].rounds, runs[1].rounds):
        assert a["scores"].keys() == b["scores"].keys()
        assert all(abs(a["scores"][k] - b["scores"][k]) < 0.5 for k in a["scores"])  # uint8 rounding at most


def test_resume_after_sigkill_rescoring_nothing(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(HERE / "hunt_worker.py"), str(run), "0.3"], cwd=HERE)
    journal = run / "journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(read_journal(journal)) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = read_journal(journal)
    assert 3 <= len(finished) < 16, "the kill must land mid-round"
    calls = []

    def counting(images, prompts):
        calls.append(len(images))
        return brightness(images, prompts)

    resumed = hunter(run, counting).run()
    reference = hunter(tmp_path / "reference", brightness).run()
    assert resumed.order == reference.order
    pairs = len(CONFIG["prompts"])
    total_candidates = 16 + 14  # round 0: every head; round 1: all but the 2 chosen
    assert sum(calls) == (total_candidates - len(finished)) * pairs  # finished candidates were not re-scored
    keys = [(r["round"], r["layer"], r["head"]) for r in read_journal(journal)]
    assert len(keys) == len(set(keys)) == total_candidates
    # A finished run resumes to the same result without generating anything.
    calls.clear()
    assert hunter(run, counting).run().order == reference.order and calls == []


def test_other_config_is_refused(tmp_path):
    pipe = load_pipeline("tiny-sd3")
    HeadHunter(pipe, brightness, SearchConfig(prompts=["a"], rounds=1, top_k=1, pool="0.0-1", **SMALL), tmp_path).run()
    with pytest.raises(ValueError, match="different settings"):
        HeadHunter(pipe, brightness, SearchConfig(prompts=["b"], rounds=1, top_k=1, **SMALL), tmp_path)


def test_config_pairs_presets_and_errors():
    c = SearchConfig(prompts=["x", "y"], seeds=[0, 1, 2], pairing="product", style_prompt="golden hour")
    assert c.pairs()[:2] == [("golden hour, x", 0), ("golden hour, x", 1)] and len(c.pairs()) == 6
    assert SearchConfig(prompts=["x", "y"], seeds=[5]).pairs() == [("x", 5), ("y", 5)]
    with pytest.raises(ValueError, match="one seed per prompt"):
        SearchConfig(prompts=["x", "y"], seeds=[1, 2, 3])
    general = SearchConfig(**preset("general", "sd3"))
    assert len(general.pairs()) == 20 and general.top_k == 24 and general.pag_identity_weight == 0.25
    style = preset("style", "flux")
    assert style["pag_scale"] == 8.0 and style["num_inference_steps"] == 15 and len(style["prompts"]) == 5
    assert (
        SearchConfig(prompts=["x"], batch_size=1).config_hash()
        == SearchConfig(prompts=["x"], batch_size=9).config_hash()
    )
    with pytest.raises(ValueError, match="Unknown objective"):
        HeadHunter(load_pipeline("tiny-sd3"), "aesthetics", SearchConfig(prompts=["x"]), "/nonexistent/never")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return write_tiny_clip_checkpoint(root, "tiny-clip")


def hunt_args(out, tiny_clip):
    config, weights = tiny_clip
    return [
        "hunt",
        "--model",
        "tiny-sd3",
        "--prompts",
        "a cat",
        "--seeds",
        "0-1",
        "--rounds",
        "2",
        "--top-k",
        "2",
        "--pool",
        "0-1",
        "--objective",
        "clip",
        "--objective-arch",
        str(config),
        "--objective-model",
        str(weights),
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--max-sequence-length",
        "16",
        "--batch-size",
        "3",
        "--output-dir",
        str(out),
        "--no-progress",
        "--validation-images",
        "2",
    ]


def test_cli_hunt_report_and_two_processes(tmp_path, tiny_clip):
    from headpag.cli import main

    assert main(hunt_args(tmp_path / "one", tiny_clip)) == 0
    report = tmp_path / "one" / "report"
    assert {"README.md", "heatmap_round_0.png", "heatmap_round_1.png", "validation.png"} <= {
        p.name for p in report.iterdir()
    }
    (report / "README.md").unlink()
    assert main(["hunt", "--report", str(tmp_path / "one")]) == 0
    assert "Selected heads, in order" in (report / "README.md").read_text()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "headpag",
        *hunt_args(tmp_path / "two", tiny_clip),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "selected_heads.json").read_text())
    two = json.loads((tmp_path / "two" / "selected_heads.json").read_text())
    assert one["provenance"]["order"] == two["provenance"]["order"]
    for r in (0, 1):
        a = json.loads((tmp_path / "one" / "rounds" / f"round_{r}.json").read_text())["scores"]
        b = json.loads((tmp_path / "two" / "rounds" / f"round_{r}.json").read_text())["scores"]
        assert [x[:2] for x in a] == [x[:2] for x in b]
        np.testing.assert_allclose([x[2] for x in a], [x[2] for x in b], atol=1e-3)


@pytest.mark.parametrize("strategy", ["halving", "gradient"])
def test_two_processes_equal_one_for_every_strategy(tmp_path, tiny_clip, strategy):
    """`torchrun --nproc_per_node 2` gives the one-process selection and scores for halving and the gradient
    prefilter too (CLIP score is differentiable)."""
    from headpag.cli import main

    extra = ["--strategy", strategy] + (["--grad-steps", "1"] if strategy == "gradient" else [])
    assert main([*hunt_args(tmp_path / "one", tiny_clip), *extra]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    port = "29541" if strategy == "halving" else "29542"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "-m"]
    cmd += ["headpag", *hunt_args(tmp_path / "two", tiny_clip), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "selected_heads.json").read_text())
    two = json.loads((tmp_path / "two" / "selected_heads.json").read_text())
    assert one["provenance"]["order"] == two["provenance"]["order"]
    a = json.loads((tmp_path / "one" / "rounds" / "round_0.json").read_text())["scores"]
    b = json.loads((tmp_path / "two" / "rounds" / "round_0.json").read_text())["scores"]
    assert [x[:2] for x in a] == [x[:2] for x in b]
    np.testing.assert_allclose([x[2] for x in a], [x[2] for x in b], atol=1e-3)
