"""The architecture's layers (see the import-linter contracts in pyproject.toml): imports point down only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """`lint-imports` checks every import, also those inside functions, against the layer contracts."""
    script = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(script)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
