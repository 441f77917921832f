"""No code written twice: pylint's duplicate-code check (8 or more similar lines) finds no pair under `headpag/`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_no_duplicate_code():
    script = Path(sys.executable).with_name("pylint")
    result = subprocess.run(
        [str(script), "--disable=all", "--enable=duplicate-code", "--min-similarity-lines=8", "headpag"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "R0801" not in result.stdout
