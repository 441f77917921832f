"""
Replaying a finished round on resume: its round file is used only when it is exactly what this run would write
(the same candidates, the strategy's schedule, the top-k of its scores, the selected heads of the earlier rounds);
anything else is warned about and the round is recomputed from the journal.
"""

from __future__ import annotations

from diffusers.utils import logging

from .gradient import read_gradients
from .strategies import RoundOutcome, Stage, rank, strategy_schedule


logger = logging.get_logger(__name__)

Head = tuple[int, int]


def replay_round(hunter, r: int, pool: list[Head], selected: list[Head]) -> RoundOutcome | None:
    """A round file's outcome when it is exactly what this run would write, else `None` (warned)."""
    round_file = hunter.run_dir.round_path(r)
    if not round_file.exists():
        return None
    parsed = hunter.run_dir.read_round(r)
    if parsed is None:
        return None
    scores, chosen, recorded_selected = parsed
    stages, problem = None, None
    prefilter = None
    if hunter.config.strategy == "gradient":
        gradients = read_gradients(hunter, r, pool, selected)
        if gradients is None:
            return None
        prefilter = gradients[0]
        pool = sorted(rank(prefilter, min(hunter.config.kept_by_prefilter, len(pool))))
    if set(scores) != set(pool):
        problem = "its scored heads are not this round's candidates"
    else:
        stages, problem = _read_stages(hunter, r, pool)
    if problem is None and chosen != rank({h: scores[h] for h in stages[-1].candidates}, hunter.config.top_k):
        problem = "its chosen heads are not the top-k of its scores"
    elif problem is None and recorded_selected != selected + chosen:
        problem = "its selected heads do not follow the earlier rounds"
    if problem:
        logger.warning("%s: %s; the round is recomputed from the journal.", round_file, problem)
        return None
    for stage, following in zip(stages, stages[1:]):
        stage.kept = list(following.candidates)
    stages[-1].kept = list(chosen)
    hunter._replayed.add(r)
    return RoundOutcome(scores, chosen, stages, prefilter)


def _read_stages(hunter, r: int, pool: list[Head]) -> tuple[list[Stage] | None, str | None]:
    """The stages of a round file and `None`, or `None` and why they are not this run's schedule."""
    recorded = hunter.run_dir.read_stages(r)
    c, all_pairs = hunter.config, list(range(hunter.num_pairs))
    if isinstance(recorded, str):
        return None, recorded
    if recorded is None:  # written before the strategies existed: one exhaustive stage
        if c.strategy != "exhaustive" and c.halving_min_pairs < hunter.num_pairs:
            return None, "it records no stages"
        return [Stage(all_pairs, list(pool))], None
    stages = recorded
    # The schedule the strategy follows: which pairs each stage renders and how many candidates it keeps.
    schedule = strategy_schedule(c, len(pool), hunter.num_pairs)
    if len(stages) != len(schedule):
        return None, f"its {len(stages)} stage(s) do not follow the {c.strategy} schedule of {len(schedule)}"
    previous = set(pool)
    for i, (stage, plan) in enumerate(zip(stages, schedule)):
        if stage.pairs != plan.pairs or len(stage.candidates) != plan.candidates or stage.proxy != plan.proxy:
            return None, f"its stage {i} does not follow the {c.strategy} schedule"
        if len(set(stage.candidates)) != plan.candidates or not set(stage.candidates) <= previous:
            return None, f"its stage {i} holds candidates that were not in play"
        previous = set(stage.candidates)
    return stages, None
