"""
A HeadHunter run directory written by an earlier version of headpag (`tests/fixtures/search-run-v1`: config, journal,
rounds, gradient rankings, selected heads) resumes without rendering anything, and reports and compares exactly as
it did when it was written (`search-run-v1.expected.json`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from headpag.models.tiny import tiny_sd3_components
from headpag.pipelines.sd3 import StableDiffusion3HeadPAGPipeline
from headpag.search import HeadHunter, SearchConfig, compare_runs, write_report


FIXTURE = Path(__file__).parent / "fixtures" / "search-run-v1"
EXPECTED = json.loads((FIXTURE.parent / "search-run-v1.expected.json").read_text())
CONFIG = SearchConfig(
    prompts=["a cat", "a dog", "a red car"],
    seeds=[0],
    rounds=2,
    top_k=1,
    strategy="gradient",
    grad_steps=2,
    prefilter_keep=4,
    num_inference_steps=2,
    height=32,
    width=32,
    max_sequence_length=16,
)


@pytest.fixture
def run(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(FIXTURE, folder)
    return folder


def test_an_old_run_resumes_without_rendering(run):
    calls = []

    def brightness(images, prompts):
        calls.append(len(images))
        if isinstance(images, torch.Tensor):
            return images.mean(dim=(1, 2, 3))
        return [float(np.asarray(im, np.float32).mean() / 255) for im in images]

    brightness.differentiable = True
    torch.manual_seed(0)
    pipe = StableDiffusion3HeadPAGPipeline(**tiny_sd3_components(num_layers=4, num_heads=4))
    pipe.set_progress_bar_config(disable=True)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = HeadHunter(pipe, brightness, CONFIG, run).run()
    assert calls == []
    assert [list(h) for h in result.order] == EXPECTED["order"]
    assert result.cost == EXPECTED["cost"]
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    selected = Path("selected_heads.json")  # rewritten at the end of every run (it names the run's folder)
    assert json.loads(after.pop(selected))["heads"] == json.loads(before.pop(selected))["heads"]
    assert {k: v for k, v in after.items() if k in before} == before  # nothing else the run had is rewritten


def test_an_old_run_reports_and_compares_unchanged(run):
    assert (write_report(run) / "README.md").read_text() == EXPECTED["report"].replace("{run}", str(run))
    assert repr(compare_runs(run, run)) == EXPECTED["compare"]
