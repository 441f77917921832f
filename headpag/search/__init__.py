"""HeadHunter: greedy search for the attention heads to perturb (arXiv 2506.10978, Algorithm 1)."""

from .config import SearchConfig, preset, read_prompts
from .hunter import HeadHunter, SearchResult
from .journal import Journal, read_journal
from .objectives import load_objective
from .report import write_report


__all__ = [
    "HeadHunter",
    "Journal",
    "SearchConfig",
    "SearchResult",
    "load_objective",
    "preset",
    "read_journal",
    "read_prompts",
    "write_report",
]
