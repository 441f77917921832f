"""
Metrics that load by name alone (their weights ship with a package or are found by their own loaders), registered
through the `headpag.pair_metrics` and `headpag.features` entry points (see [`~headpag.models.catalog`]): one
lookup for `headpag eval`, the UI's Evaluate tab and HeadHunter objectives. CLIP score and PickScore take model
options and are built where those options are parsed.
"""

from __future__ import annotations

from ..models.catalog import load_registered, registered


def pair_metric_names() -> list[str]:
    """Per-image metrics registered by name (e.g. `"shapes-judge"`, `"shapes-correct"`)."""
    return registered("headpag.pair_metrics")


def feature_names() -> list[str]:
    """Feature models for FID / KID / PRDC registered by name (e.g. `"shapes-judge"`)."""
    return registered("headpag.features")


def load_pair_metric(name: str, device=None):
    """A registered per-image metric: `score(images, prompts)`, `provenance`; optionally `score_tensor`."""
    return load_registered("headpag.pair_metrics", name, "metric")(device=device)


def load_features(name: str, device=None):
    """A registered feature model: `__call__(images) -> (N, D)`, `name`, `provenance`."""
    return load_registered("headpag.features", name, "feature model")(device=device)
