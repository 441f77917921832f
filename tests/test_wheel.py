"""The built wheel carries every file the package needs at run time: the testbed's model folder and judge, the presets,
the prompt files, and the entry points that register the testbed (nothing outside `headpag/`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_the_package_data_and_the_registrations(tmp_path):
    source = tmp_path / "src"  # a copy: no stale build/ folder of the checkout can slip into the wheel
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "test-screenshots")
    shutil.copytree(ROOT, source, ignore=skip)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = tmp_path.glob("headpag-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {
        p.relative_to(ROOT).as_posix()
        for folder in ("headpag/testbed/weights", "headpag/presets", "headpag/search/prompts")
        for p in (ROOT / folder).rglob("*")
        if p.is_file()
    }
    assert data and data <= names, sorted(data - names)
    assert all(name.startswith(("headpag/", "headpag-")) for name in names), sorted(names)[:5]
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[headpag.models]" in text and "headpag-shapes = headpag.testbed.registry:SHAPES_SD3" in text
    assert "shapes-structure = headpag.testbed.structure:ShapesStructureScore" in text
