"""
HeadHunter's Algorithm 1 as a plain function of a `score(candidates, pairs)` callable, and the strategies that decide
which candidates a round scores on which pairs.

Nothing here renders, journals or knows about processes: the caller's `score` does (see [`HeadHunter`]), so a round
that is replayed from the journal runs the very same code and simply finds every score already known.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


Head = tuple[int, int]
# `score(candidates, pairs) -> {candidate: [score on pairs[0], score on pairs[1], ...]}` (pair indices into the M
# prompt-seed pairs; a candidate's score on a pair never depends on the call that asks for it). A strategy that uses a
# proxy fidelity calls `score(candidates, pairs, proxy=True)` for the proxy scores (never mixed with the full ones).
Score = Callable[..., Mapping[Head, Sequence[float]]]
# `strategy(score, candidates, num_pairs, top_k) -> RoundOutcome`
Strategy = Callable[[Score, Sequence[Head], int, int], "RoundOutcome"]


@dataclass
class Stage:
    r"""
    One fidelity stage of a round.

    Args:
        pairs (`list[int]`): The pairs rendered at this stage (new to every candidate of the stage).
        candidates (`list[tuple[int, int]]`): The candidates scored at this stage.
        kept (`list[tuple[int, int]]`): The candidates that went on to the next stage (the chosen ones, at the last).
        proxy (`bool`, defaults to `False`): Whether the stage rendered at the proxy fidelity.
    """

    pairs: list[int]
    candidates: list[Head]
    kept: list[Head] = field(default_factory=list)
    proxy: bool = False

    @property
    def dropped(self) -> list[Head]:
        kept = set(self.kept)
        return [h for h in self.candidates if h not in kept]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pairs": list(self.pairs), "candidates": [list(h) for h in self.candidates]}
        if self.proxy:  # full-fidelity stages keep the format they had before the proxies existed
            out["proxy"] = True
        return out


@dataclass
class RoundOutcome:
    r"""
    What one round of Algorithm 1 found.

    Args:
        scores (`dict[tuple[int, int], float]`): Every candidate's mean score over the pairs it was scored on.
        chosen (`list[tuple[int, int]]`): The top-k of the last stage, best first.
        stages (`list[Stage]`): The stages, first to last (one for the exhaustive strategy).
        prefilter (`dict[tuple[int, int], float]`, *optional*): The gradient strategy: every pool head's prefilter
            value (mean d objective / d weight), of which the top `prefilter_keep` went on to the stages.
    """

    scores: dict[Head, float]
    chosen: list[Head]
    stages: list[Stage]
    prefilter: dict[Head, float] | None = None

    def pairs_scored(self) -> dict[Head, int]:
        """
        How many pairs each candidate's score (in `scores`) was made on: the pairs of the stages at the fidelity of the
        last stage it was scored in (a proxy score is never mixed with a full-fidelity one).
        """
        last: dict[Head, bool] = {}
        for stage in self.stages:
            for head in stage.candidates:
                last[head] = stage.proxy
        counts: dict[Head, int] = {}
        for stage in self.stages:
            for head in stage.candidates:
                if stage.proxy == last[head]:
                    counts[head] = counts.get(head, 0) + len(stage.pairs)
        return counts

    def dropped_at(self) -> dict[Head, int]:
        """The stage each dropped candidate was dropped at (candidates of the last stage are not dropped)."""
        return {h: s for s, stage in enumerate(self.stages[:-1]) for h in stage.dropped}


def rank(scores: Mapping[Head, float], top_k: int) -> list[Head]:
    """The `top_k` best heads, best first; ties break by (layer, head) ascending."""
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return [head for head, _ in ranked[:top_k]]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _scores_of(
    score: Score, candidates: Sequence[Head], pairs: Sequence[int], proxy: bool = False
) -> dict[Head, list[float]]:
    got = score(list(candidates), list(pairs), proxy=True) if proxy else score(list(candidates), list(pairs))
    out = {}
    for head in candidates:
        values = list(got[head])
        if len(values) != len(pairs):
            raise ValueError(f"score gave {len(values)} scores for head {head[0]}.{head[1]} on {len(pairs)} pairs.")
        out[head] = values
    return out


def exhaustive(score: Score, candidates: Sequence[Head], num_pairs: int, top_k: int) -> RoundOutcome:
    r"""
    The paper's round: every candidate on all `num_pairs` pairs; the top-k by mean score.

    Args:
        score (`Callable`): `score(candidates, pairs) -> {candidate: scores}`.
        candidates (`list[tuple[int, int]]`): The round's pool.
        num_pairs (`int`): M. top_k (`int`): Heads chosen.
    """
    pairs = list(range(num_pairs))
    per = _scores_of(score, candidates, pairs)
    means = {head: _mean(values) for head, values in per.items()}
    chosen = rank(means, top_k)
    return RoundOutcome(means, chosen, [Stage(pairs, list(candidates), chosen)])


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One stage of successive halving: the pairs it renders, how many candidates it scores, at which fidelity."""

    pairs: list[int]
    candidates: int
    proxy: bool = False


def halving_schedule(
    num_candidates: int, num_pairs: int, top_k: int, min_pairs: int = 1, eta: int = 3, proxy: bool = False
) -> list[StagePlan]:
    r"""
    The stages of [`successive_halving`]: every candidate on the first `min_pairs` pairs, then the top
    `max(top_k, ceil(n / eta))` of the `n` scored on `eta` times as many pairs (only the new ones rendered), until all
    `num_pairs`. With a proxy, every stage but the last is at the proxy fidelity and the last renders all pairs anew.
    The strategy follows it and a replayed round is checked against it; it is the one statement of the schedule.
    """
    stages, n, done, target = [], num_candidates, 0, min(min_pairs, num_pairs)
    while True:
        final = target >= num_pairs
        first = 0 if proxy and final else done
        stages.append(StagePlan(list(range(first, target)), n, proxy and not final))
        if final:
            return stages
        n, done, target = min(n, max(top_k, math.ceil(n / eta))), target, min(target * eta, num_pairs)


def successive_halving(
    score: Score,
    candidates: Sequence[Head],
    num_pairs: int,
    top_k: int,
    min_pairs: int = 1,
    eta: int = 3,
    proxy: bool = False,
) -> RoundOutcome:
    r"""
    Successive halving within one round: every candidate on the first `min_pairs` pairs; the top
    `max(top_k, ceil(n / eta))` of the `n` scored, by mean over the pairs scored so far (ties by (layer, head)), go
    on with `eta` times as many pairs (only the new pairs are rendered); until the survivors are scored on all
    `num_pairs` pairs, among whom the top-k are chosen. With `min_pairs >= num_pairs` it is [`exhaustive`].

    Args:
        score (`Callable`): `score(candidates, pairs) -> {candidate: scores}`.
        candidates (`list[tuple[int, int]]`): The round's pool.
        num_pairs (`int`): M. top_k (`int`): Heads chosen.
        min_pairs (`int`, defaults to 1): Pairs of the first stage.
        eta (`int`, defaults to 3): Keep `1 / eta` of the candidates, multiply the pairs by `eta`.
        proxy (`bool`, defaults to `False`): Score every stage but the last at the proxy fidelity
            (`score(candidates, pairs, proxy=True)`). Proxy scores are never mixed with full-fidelity ones, so the last
            stage scores its survivors at full fidelity on **all** `num_pairs` pairs (not only the pairs new to them):
            the top-k are then chosen on full-fidelity means over the same pairs as [`exhaustive`] would use, and
            a candidate's reported score is its mean at the fidelity of the last stage it reached.
    """
    if min_pairs < 1 or eta < 2:
        raise ValueError(f"successive halving needs min_pairs >= 1 and eta >= 2, got {min_pairs} and {eta}.")
    schedule = halving_schedule(len(candidates), num_pairs, top_k, min_pairs, eta, proxy)
    scored: dict[Head, list[float]] = {head: [] for head in candidates}
    alive = list(candidates)
    stages: list[Stage] = []
    for plan, following in zip(schedule, [*schedule[1:], None]):
        if plan.pairs and plan.pairs[0] == 0:  # the first stage, or the proxy run's last: scored anew on all pairs
            for head in alive:
                scored[head] = []
        for head, values in _scores_of(score, alive, plan.pairs, proxy=plan.proxy).items():
            scored[head] += values
        stage = Stage(plan.pairs, alive, proxy=plan.proxy)
        stages.append(stage)
        means = {head: _mean(scored[head]) for head in alive}
        if following is None:
            stage.kept = rank(means, top_k)
        else:
            alive = sorted(rank(means, following.candidates))
            stage.kept = alive
    return RoundOutcome({head: _mean(v) for head, v in scored.items() if v}, stages[-1].kept, stages)


def gradient_prefiltered(
    score: Score,
    candidates: Sequence[Head],
    num_pairs: int,
    top_k: int,
    keep: int | None = None,
    min_pairs: int = 1,
    eta: int = 3,
) -> RoundOutcome:
    r"""
    The gradient strategy's round: `score.prefilter(candidates) -> {head: value}` ranks the whole pool by one
    differentiable pass (see [`~search.gradient.head_gradients`]; higher = adding the head raises the objective), the
    top `keep` (ties by (layer, head)) are scored exactly by [`successive_halving`], which chooses the top-k.

    Args:
        score (`Callable`): `score(candidates, pairs)` with a `prefilter(candidates)` method.
        candidates (`list[tuple[int, int]]`): The round's pool.
        num_pairs (`int`): M. top_k (`int`): Heads chosen.
        keep (`int`, *optional*): Heads kept by the prefilter (defaults to `4 * top_k`, at least `top_k`).
        min_pairs, eta (`int`): See [`successive_halving`].
    """
    prefilter = getattr(score, "prefilter", None)
    if prefilter is None:
        raise ValueError("The gradient strategy needs a score callable with a `prefilter(candidates)` method.")
    values = {head: float(v) for head, v in prefilter(list(candidates)).items()}
    if set(values) != set(candidates):
        raise ValueError("prefilter must give one value for every candidate of the round.")
    kept = sorted(rank(values, max(top_k, 4 * top_k if keep is None else keep)))
    outcome = successive_halving(score, kept, num_pairs, top_k, min_pairs=min_pairs, eta=eta)
    outcome.prefilter = values
    return outcome


def make_strategy(
    name: str = "exhaustive",
    halving_min_pairs: int = 1,
    halving_eta: int = 3,
    proxy: bool = False,
    prefilter_keep: int | None = None,
) -> Strategy:
    r"""
    The strategy function of a [`SearchConfig`]'s `strategy`.

    Args:
        name (`str`): `"exhaustive"`, `"halving"` or `"gradient"`.
        halving_min_pairs, halving_eta (`int`): See [`successive_halving`] (also the gradient strategy's exact stage).
        proxy (`bool`, defaults to `False`): `"halving"` only: early stages at the proxy fidelity.
        prefilter_keep (`int`, *optional*): `"gradient"` only: see [`gradient_prefiltered`].
    """
    if proxy and name != "halving":
        raise ValueError(f"A proxy fidelity applies to the 'halving' strategy, not {name!r}.")
    if name == "exhaustive":
        return exhaustive
    if name == "halving":
        return functools.partial(successive_halving, min_pairs=halving_min_pairs, eta=halving_eta, proxy=proxy)
    if name == "gradient":
        return functools.partial(
            gradient_prefiltered, keep=prefilter_keep, min_pairs=halving_min_pairs, eta=halving_eta
        )
    raise ValueError(f"Unknown strategy {name!r}; allowed: 'exhaustive', 'halving', 'gradient'.")


def head_hunter(
    score_for: Callable[[int, list[Head]], Score],
    pool: Sequence[Head],
    rounds: int,
    top_k: int,
    num_pairs: int,
    strategy: Strategy = exhaustive,
    replay: Callable[[int, list[Head], list[Head]], RoundOutcome | None] | None = None,
    on_round: Callable[[int, list[Head], RoundOutcome], None] | None = None,
) -> list[RoundOutcome]:
    r"""
    Algorithm 1 (arXiv 2506.10978): in round t, every head still in the pool is scored with the heads selected so far
    on the M prompt-seed pairs (at the fidelity the strategy decides); the top-k join the selected set and leave the
    pool.

    Args:
        score_for (`Callable`): `score_for(round, selected) -> score`, where `score(candidates, pairs)` scores each
            candidate head added to `selected` on each pair (rendering, caching and journaling live behind it).
        pool (`list[tuple[int, int]]`): The candidate heads. rounds (`int`): R. top_k (`int`): k.
        num_pairs (`int`): M.
        strategy (`Callable`, defaults to [`exhaustive`]): `strategy(score, candidates, num_pairs, top_k)`.
        replay (`Callable`, *optional*): `replay(round, pool, selected)`: a finished round's outcome, or `None` to
            run it.
        on_round (`Callable`, *optional*): `on_round(round, selected_before, outcome)` after each round.

    Returns:
        `list[RoundOutcome]`: one per round run (fewer than `rounds` when the pool ran out).
    """
    pool = list(pool)
    selected: list[Head] = []
    outcomes: list[RoundOutcome] = []
    for t in range(rounds):
        if not pool:
            break
        outcome = replay(t, list(pool), list(selected)) if replay is not None else None
        if outcome is None:
            outcome = strategy(score_for(t, list(selected)), list(pool), num_pairs, top_k)
        if on_round is not None:
            on_round(t, list(selected), outcome)
        outcomes.append(outcome)
        selected += outcome.chosen
        chosen = set(outcome.chosen)
        pool = [h for h in pool if h not in chosen]
    return outcomes


def strategy_schedule(config, num_candidates: int, num_pairs: int) -> list[StagePlan]:
    """The stages a [`SearchConfig`]'s strategy runs on `num_candidates` (exhaustive: one stage on every pair)."""
    min_pairs = num_pairs if config.strategy == "exhaustive" else config.halving_min_pairs
    return halving_schedule(num_candidates, num_pairs, config.top_k, min_pairs, config.halving_eta, config.has_proxy)


def projected_work(config, pool_size: int) -> tuple[int, int]:
    r"""
    `(images, image-steps)` a search renders at most (the cost it is refused beyond before it starts): per round,
    every stage of its strategy's schedule over the candidates left, each image at its stage's fidelity (proxy
    stages at `proxy_steps`), and the gradient prefilter's differentiable renders of `grad_steps` counted three times
    (backward as two forwards).

    Args:
        config ([`SearchConfig`]): The settings. pool_size (`int`): The candidate heads.
    """
    pairs, images, steps, left = len(config.pairs()), 0, 0, pool_size
    for _ in range(config.rounds):
        if left <= 0:
            break
        candidates = left
        if config.strategy == "gradient":
            images += 3 * pairs
            steps += 3 * pairs * config.grad_steps
            candidates = min(left, config.kept_by_prefilter)
        for stage in strategy_schedule(config, candidates, pairs):
            count = stage.candidates * len(stage.pairs)
            images += count
            steps += count * config.fidelity(stage.proxy)["steps"]
        left -= config.top_k
    return images, steps
