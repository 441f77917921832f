"""
What the testbed registers with headpag's catalogue (entry points in `pyproject.toml`): the `headpag-shapes` (SD3)
and `headpag-shapes-flux` (FLUX) model folders (each folder's `headpag_config.json` holds what the model recommends,
see [`~headpag.models.catalog.model_defaults`]) and, in `judge` and `structure`, its metrics.
"""

from __future__ import annotations

from pathlib import Path


SHAPES_SD3 = {
    "folder": Path(__file__).resolve().parent / "weights" / "shapes-sd3",
    "missing": "train it with `python -m headpag.testbed.train`",
}

SHAPES_FLUX = {
    "folder": Path(__file__).resolve().parent / "weights" / "shapes-flux",
    "missing": "train it with `python -m headpag.testbed.train --model flux`",
}
