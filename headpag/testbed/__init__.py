"""
The shapes testbed: a small SD3 model trained offline on procedural shapes (`headpag-shapes`), and a judge that reads
what it drew. Data in `data`, networks in `model`, training in `train`, the judge as a metric in `judge`.

Names load on first use (PEP 562), so `python -m headpag.testbed.data` / `.train` run their module once, without
runpy's "found in sys.modules" warning.
"""

from __future__ import annotations

import importlib
from typing import Any


_SOURCES = {
    **dict.fromkeys(
        ("ATTRIBUTES", "COLORS", "HELD_OUT", "POSITIONS", "SHAPES", "SIZES", "Scene", "all_scenes", "parse_prompt"),
        "data",
    ),
    **dict.fromkeys(
        ("ShapesJudgeAccuracy", "ShapesJudgeFeatures", "ShapesJudgeScore", "all_correct", "load_judge"), "judge"
    ),
}
__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
