"""
The shapes testbed: a small SD3 model trained offline on procedural shapes (`headpag-shapes`), and a judge that reads
what it drew. Data in `data`, networks in `model`, training in `train`, the judge as a metric in `judge`.
"""

from .data import ATTRIBUTES, COLORS, HELD_OUT, POSITIONS, SHAPES, SIZES, Scene, all_scenes, parse_prompt
from .judge import ShapesJudgeAccuracy, ShapesJudgeFeatures, ShapesJudgeScore, all_correct, load_judge


__all__ = [
    "ATTRIBUTES",
    "COLORS",
    "HELD_OUT",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "ShapesJudgeAccuracy",
    "ShapesJudgeFeatures",
    "ShapesJudgeScore",
    "all_correct",
    "all_scenes",
    "load_judge",
    "parse_prompt",
]
