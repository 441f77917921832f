"""
Metrics that load by name alone (their weights ship with headpag or are found by their own loaders): one table for
`headpag eval`, the UI's Evaluate tab and HeadHunter objectives. CLIP score and PickScore take model options and are
built where those options are parsed.
"""

from __future__ import annotations

import importlib


# name -> (module, class) of a per-image metric: `score(images, prompts)`, `provenance`; optional `score_tensor`
NAMED_PAIR_METRICS = {
    "shapes-judge": ("headpag.testbed.judge", "ShapesJudgeScore"),
    "shapes-correct": ("headpag.testbed.judge", "ShapesJudgeAccuracy"),
}
# name -> (module, class) of a feature model for FID/KID/PRDC: `__call__(images) -> (N, D)`, `name`, `provenance`
NAMED_FEATURES = {"shapes-judge": ("headpag.testbed.judge", "ShapesJudgeFeatures")}


def _load(table: dict, name: str, what: str, device=None):
    if name not in table:
        raise ValueError(f"Unknown {what} {name!r}; allowed: {', '.join(table)}.")
    module, cls = table[name]
    return getattr(importlib.import_module(module), cls)(device=device)


def load_pair_metric(name: str, device=None):
    """A per-image metric of `NAMED_PAIR_METRICS` (e.g. `"shapes-judge"`)."""
    return _load(NAMED_PAIR_METRICS, name, "metric", device)


def load_features(name: str, device=None):
    """A feature model of `NAMED_FEATURES` (e.g. `"shapes-judge"`)."""
    return _load(NAMED_FEATURES, name, "feature model", device)
