"""Metrics: CLIP score and PickScore (also HeadHunter's objectives)."""

from .clip_score import ClipScore, load_state_dict
from .pickscore import PickScore


__all__ = ["ClipScore", "PickScore", "load_state_dict"]
