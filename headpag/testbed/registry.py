"""
What the testbed registers with headpag's catalogue (entry points in `pyproject.toml`): the `headpag-shapes` model
folder with the sampler settings it was trained for, and the judge as a metric and a feature model.
"""

from __future__ import annotations

from pathlib import Path


SHAPES_SD3 = {
    "folder": Path(__file__).resolve().parent / "weights" / "shapes-sd3",
    # what the CLI's and the UI's sampler settings start from (trained at 64x64; CFG measured in
    # docs/testbed-results.md)
    "defaults": {
        "steps": 20,
        "size": 64,
        "guidance": 5.0,
        "prompt": "a large white triangle on a green background at the top right",
    },
    "missing": "train it with `python -m headpag.testbed.train`",
}
