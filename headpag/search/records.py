"""
The journal's records: what a valid record is (checked on writing and on reading), and the scores and cost they hold.

A record is one finished candidate and stage: `{"round", "layer", "head", "score", "scores", "cost",
"config_hash"}`, plus `"stage"` and `"pairs"` (the pair indices of `"scores"`) when the stage did not render every pair
(successive halving); without `"pairs"` a record's `"scores"` are the pairs `0 .. M-1`. `"score"` is the mean of the
record's `"scores"`, `"cost"` the work the record took (see [`~search.cost.Cost`]). Runs with a proxy fidelity
(`proxy_size` / `proxy_steps`) add `"fidelity": {"proxy", "height", "width", "steps"}` to every record, the fidelity
its scores were made at; a record without it is at the configured (full) fidelity. Scores of one fidelity are never
merged with the other's (see [`pair_scores`]).
"""

from __future__ import annotations

import json
import math
from collections.abc import Container, Iterable
from typing import Any

from .cost import Cost, check_cost


Head = tuple[int, int]
# A layer or head index this large is no transformer's: refused when the model's size is unknown (grid memory).
MAX_INDEX = 4096
REQUIRED_KEYS = ("round", "layer", "head", "score")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any, limit: int = 40) -> str:
    """A short JSON-ish rendering of a decoded value, for messages (never raises)."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_pool(pool: Container[Head]) -> str:
    text = str(pool) if not isinstance(pool, (set, frozenset, list, tuple)) else f"{len(pool)} heads"
    return text if len(text) <= 80 else text[:77] + "..."


def check_head(
    layer: Any,
    head: Any,
    pool: Container[Head] | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
) -> str | None:
    r"""
    Why `(layer, head)` cannot be a candidate of a run, or `None` when it can.

    Args:
        layer, head: The indices to check (ints >= 0).
        pool (`Container[tuple[int, int]]`, *optional*): The run's candidate pool (a set of pairs or a [`HeadSet`]).
        num_layers, num_heads (`int`, *optional*): The model's size; when unknown, indices above `MAX_INDEX` are
            refused.
    """
    for name, value, limit in (("layer", layer, num_layers), ("head", head, num_heads)):
        if not _is_int(value) or value < 0:
            return f"{name} must be an int >= 0, got {value!r}"
        if limit is not None and value >= limit:
            return f"{name} {value} does not exist in the model ({limit} {name}s: 0-{limit - 1})"
        if limit is None and value > MAX_INDEX:
            return f"{name} {value} is implausibly large (> {MAX_INDEX})"
    if pool is not None and (layer, head) not in pool:
        return f"head {layer}.{head} is outside the run's pool ({_describe_pool(pool)})"
    return None


def check_record(
    record: Any,
    config_hash: str | None = None,
    rounds: int | None = None,
    pool: Container[Head] | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    num_pairs: int | None = None,
) -> str | None:
    r"""
    Why a journal record is invalid, or `None` when it is valid.

    A valid record is a JSON object with `round` (int >= 0, below `rounds` when given), `layer` and `head` (ints,
    inside the model and the pool when given), `score` (a finite number), optionally `scores` (a list of finite
    numbers), `stage` (an int >= 0), `pairs` (with `scores`: as many distinct pair indices >= 0, below `num_pairs`
    when given; without it, `scores` must hold `num_pairs` scores when given), `cost` (an object of finite numbers
    >= 0: `row_evals`, `images`, `seconds`), and `config_hash` equal to the run's when `config_hash` is given.

    Args:
        record: A decoded JSON value.
        config_hash (`str`, *optional*): The run's settings hash.
        rounds (`int`, *optional*): The configured number of rounds.
        pool, num_layers, num_heads: See [`check_head`].
        num_pairs (`int`, *optional*): M, the run's prompt-seed pairs.
    """
    if not isinstance(record, dict):
        return f"not a JSON object (got {_short(record)})"
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if config_hash is not None and "config_hash" not in record:
        missing.append("config_hash")
    if missing:
        return "missing key" + ("s " if len(missing) > 1 else " ") + ", ".join(repr(k) for k in missing)
    if config_hash is not None and record["config_hash"] != config_hash:
        return f"config hash {record['config_hash']!r} is not this run's ({config_hash!r})"
    r = record["round"]
    if not _is_int(r) or r < 0:
        return f"round must be an int >= 0, got {r!r}"
    if rounds is not None and r >= rounds:
        return f"round {r} is unknown: the run has {rounds} round{'s' if rounds != 1 else ''} (0-{rounds - 1})"
    problem = check_head(record["layer"], record["head"], pool, num_layers, num_heads)
    if problem:
        return problem
    if not _is_finite_number(record["score"]):
        return f"score must be a finite number, got {record['score']!r}"
    if "scores" in record:
        scores = record["scores"]
        if not isinstance(scores, list) or not scores or not all(_is_finite_number(s) for s in scores):
            return f"scores must be a non-empty list of finite numbers, got {_short(scores, 60)}"
    if "stage" in record and (not _is_int(record["stage"]) or not 0 <= record["stage"] <= MAX_INDEX):
        return f"stage must be an int >= 0, got {_short(record['stage'])}"
    if "pairs" in record:
        pairs = record["pairs"]
        if "scores" not in record:
            return "pairs without scores"
        if (
            not isinstance(pairs, list)
            or not all(_is_int(j) and j >= 0 for j in pairs)
            or len(set(pairs)) < len(pairs)
        ):
            return f"pairs must be a list of distinct ints >= 0, got {_short(pairs, 60)}"
        if len(pairs) != len(record["scores"]):
            return f"pairs name {len(pairs)} pairs but scores hold {len(record['scores'])}"
        if num_pairs is not None and any(j >= num_pairs for j in pairs):
            return f"pairs {_short(pairs, 60)} name a pair the run lacks ({num_pairs} pairs: 0-{num_pairs - 1})"
    elif "scores" in record and num_pairs is not None and len(record["scores"]) != num_pairs:
        return f"scores hold {len(record['scores'])} scores but the run has {num_pairs} pairs (and no 'pairs' key)"
    if "cost" in record:
        problem = check_cost(record["cost"])
        if problem:
            return problem
    if "fidelity" in record:
        problem = check_fidelity(record["fidelity"])
        if problem:
            return problem
    return None


def check_fidelity(doc: Any) -> str | None:
    """Why a record's `"fidelity"` is invalid, or `None`: `{"proxy": bool, "height", "width", "steps": int >= 1}`."""
    if not isinstance(doc, dict) or not isinstance(doc.get("proxy"), bool):
        return f"fidelity must be a JSON object with a boolean 'proxy', got {_short(doc)}"
    for key in ("height", "width", "steps"):
        if not _is_int(doc.get(key)) or not 1 <= doc[key] <= 1 << 20:
            return f"fidelity {key!r} must be an int >= 1, got {_short(doc.get(key))}"
    return None


def is_proxy(record: dict[str, Any]) -> bool:
    """Whether a (valid) record's scores were made at the proxy fidelity."""
    fidelity = record.get("fidelity")
    return isinstance(fidelity, dict) and fidelity.get("proxy") is True


def record_key(record: dict[str, Any]) -> tuple[int, int, int, int]:
    """`(round, layer, head, stage)`: what makes a (valid) record unique in a journal."""
    return record["round"], record["layer"], record["head"], record.get("stage", 0)


def record_pairs(record: dict[str, Any], num_pairs: int | None = None) -> dict[int, float]:
    r"""
    `{pair index: score}` of a valid record: its `pairs` and `scores`; `scores` without `pairs` are the pairs
    `0 .. len(scores)-1`; a record with only a mean `score` counts as that score on each of the `num_pairs` pairs
    (one pair when unknown).

    Args:
        record (`dict`): A record that passed [`check_record`].
        num_pairs (`int`, *optional*): M.
    """
    if "scores" not in record:
        return {j: float(record["score"]) for j in range(num_pairs or 1)}
    pairs = record.get("pairs", range(len(record["scores"])))
    return {j: float(s) for j, s in zip(pairs, record["scores"])}


def pair_scores(
    records: Iterable[dict[str, Any]], round_index: int, num_pairs: int | None = None, proxy: bool | None = None
) -> dict[Head, dict[int, float]]:
    r"""
    `{(layer, head): {pair index: score}}` of one round, merged over the round's records (stages) in file order; a
    pair named by two records keeps the first record's score. Scores of the two fidelities are never merged.

    Args:
        records (`list[dict]`): Valid records (from [`read_journal`] or [`scan_journal`]).
        round_index (`int`): The round.
        num_pairs (`int`, *optional*): M (see [`record_pairs`]).
        proxy (`bool`, *optional*): `False`: full-fidelity scores only; `True`: proxy scores only; `None` (default):
            each head's full-fidelity scores when it has any, else its proxy scores (what the round reports).
    """
    by_fidelity: dict[bool, dict[Head, dict[int, float]]] = {False: {}, True: {}}
    for record in records:
        if record["round"] != round_index:
            continue
        known = by_fidelity[is_proxy(record)].setdefault((record["layer"], record["head"]), {})
        for j, score in record_pairs(record, num_pairs).items():
            known.setdefault(j, score)
    if proxy is not None:
        return by_fidelity[proxy]
    full = by_fidelity[False]
    return {**{h: v for h, v in by_fidelity[True].items() if h not in full}, **full}


def mean_scores(pairs: dict[Head, dict[int, float]]) -> dict[Head, float]:
    """Each head's mean over the pairs it was scored on (summed in pair order, like the search does)."""
    return {head: sum(known[j] for j in sorted(known)) / len(known) for head, known in pairs.items() if known}


def journal_cost(records: Iterable[dict[str, Any]], round_index: int | None = None) -> Cost:
    """The work journaled in `records` (of one round, or of all)."""
    total = Cost()
    for record in records:
        if round_index is None or record["round"] == round_index:
            total = total + Cost.from_dict(record.get("cost"))
    return total
