"""HeadHunter: greedy search for the attention heads to perturb (arXiv 2506.10978, Algorithm 1)."""

from .agreement import compare_runs
from .config import SearchConfig, preset, read_prompts
from .cost import Cost
from .gradient import head_gradients
from .hunter import HeadHunter, SearchResult
from .journal import Journal, read_journal
from .objectives import load_objective
from .report import write_report
from .strategies import (
    RoundOutcome,
    Stage,
    exhaustive,
    gradient_prefiltered,
    head_hunter,
    make_strategy,
    successive_halving,
)


__all__ = [
    "Cost",
    "HeadHunter",
    "Journal",
    "RoundOutcome",
    "SearchConfig",
    "SearchResult",
    "Stage",
    "compare_runs",
    "exhaustive",
    "gradient_prefiltered",
    "head_gradients",
    "head_hunter",
    "load_objective",
    "make_strategy",
    "preset",
    "read_journal",
    "read_prompts",
    "successive_halving",
    "write_report",
]
