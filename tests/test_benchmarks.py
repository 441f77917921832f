"""The benchmark scripts run to completion (tiny models, CPU), so they cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_bench_pipelines_tiny_runs_every_configuration():
    out = subprocess.run(
        [sys.executable, "bench_pipelines.py", "--device", "cpu", "--tiny"],
        cwd=BENCHMARKS, capture_output=True, text=True, timeout=900, check=True,
    ).stdout  # fmt: skip
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_pipelines import CONFIGS
    finally:
        sys.path.remove(str(BENCHMARKS))
    rows = [line for line in out.splitlines() if line.startswith("| ") and "configuration" not in line]
    assert len(rows) == len(CONFIGS)
    for label in CONFIGS.values():
        row = next(r for r in rows if r.startswith(f"| {label} |"))
        if "compile" in label:
            assert row.endswith("| 0 |"), row  # nothing compiled after the warm-up call
