"""
Scoring image sets with the chosen metrics: per-pair metrics (CLIP score, PickScore, ...) with paired statistics, and
set metrics (FID, KID, PRDC, CMMD) against a reference folder; image sets come from a generation grid
([`~headpag.eval.generation.Comparison`]) or from existing folders.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers.utils import logging
from PIL import Image

from .distribution import (
    FID_MIN_IMAGES,
    cached_reference_features,
    cmmd,
    fid_bootstrap_ci,
    frechet_distance,
    image_files,
    is_image,
    kernel_distance,
    precision_recall_density_coverage,
)
from .distribution import kid_subset_size as resolve_kid_subset_size
from .paired import clustered_mean_ci
from .registry import pair_metric_names


logger = logging.get_logger(__name__)


BUILTIN_PAIR_METRICS = ("clip", "pickscore", "aesthetic", "hpsv2", "imagereward")
SET_METRICS = ("fid", "kid", "prdc", "cmmd")


def metric_names() -> tuple[str, ...]:
    """Every metric `headpag eval` and the UI offer: the built-in ones and those registered by name."""
    return (*BUILTIN_PAIR_METRICS, *pair_metric_names(), *SET_METRICS)


def parse_metrics(names: str | Sequence[str]) -> list[str]:
    """Metric names (`"clip,fid"` or a list), checked against [`metric_names`], duplicates dropped."""
    items = names.split(",") if isinstance(names, str) else list(names)
    cleaned = [m.strip().lower() for m in items if m.strip()]
    allowed = metric_names()
    unknown = [m for m in cleaned if m not in allowed]
    if unknown or not cleaned:
        raise ValueError(f"Unknown metric(s) {unknown or [names]}; allowed: {', '.join(allowed)}.")
    return list(dict.fromkeys(cleaned))


@dataclass
class ImageSet:
    """The images of one configuration with their prompts (and seeds where known)."""

    name: str
    paths: list[Path]
    prompts: list[str]
    seeds: list[int | None]
    options: str = ""

    def images(self) -> list[Image.Image]:
        return [Image.open(p).convert("RGB") for p in self.paths]


def image_sets_from_folder(folder: str | os.PathLike, prompts: Sequence[str] | None = None) -> list[ImageSet]:
    r"""
    Existing images to score: a folder of images (one set), or a folder of sub-folders (one set each, e.g. the
    `images/` folder of an `headpag eval` run); a folder with both is refused (no image is silently left out).

    An image's prompt is its PNG `prompt` text (written by headpag) or else, in name order, the matching line of
    `prompts` (then the counts must agree).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Image folder {folder} does not exist.")
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and any(is_image(p) for p in d.iterdir()))
    loose = [p for p in folder.iterdir() if is_image(p)]
    if subdirs and loose:
        raise ValueError(
            f"{folder} holds {len(loose)} image(s) beside {len(subdirs)} sub-folder(s) of images; score a folder of "
            "images or a folder of sub-folders (one set each): move the top-level images into a sub-folder."
        )
    sets = []
    for d in subdirs or [folder]:
        paths = image_files(d)
        stored = []
        for p in paths:
            with Image.open(p) as im:
                stored.append(getattr(im, "text", {}).get("prompt"))
        if all(s is not None for s in stored):
            texts = stored
        elif prompts is not None and len(prompts) == len(paths):
            texts = list(prompts)
        else:
            raise ValueError(
                f"Cannot pair the {len(paths)} images in {d} with prompts: they carry no 'prompt' metadata and "
                f"{0 if prompts is None else len(prompts)} prompts were given (one per image, in name order, needed)."
            )
        sets.append(ImageSet(d.name, paths, texts, [None] * len(paths)))
    return sets


def score_sets(
    sets: Sequence[ImageSet],
    pair_metrics: dict[str, Callable] | None = None,
    features=None,
    set_metrics: Sequence[str] = (),
    reference: str | os.PathLike | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int | None = None,
    progress: Callable[[str], None] | None = None,
    cmmd_features=None,
    cache_dir: str | os.PathLike | None = None,
    fid_resamples: int = 100,
) -> list[dict[str, Any]]:
    r"""
    Score each image set: per-image metrics with mean and 95% interval (a bootstrap that resamples prompts, seeds
    staying with their prompt), FID as a point value, KID as mean and standard deviation over subsets (reference
    features computed once, each set's features once for both).

    Args:
        sets (`list[ImageSet]`): What to score.
        pair_metrics (`dict[str, Callable]`): e.g. `{"clip": ClipScore(...)}`; each maps (images, prompts) to scores.
        features ([`FeatureExtractor`], *optional*): For FID/KID.
        set_metrics (`list[str]`): Any of `"fid"`, `"kid"`.
        reference (`str`, *optional*): Folder of reference images (needed for FID/KID).
        progress (`Callable[[str], None]`, *optional*): Called after each set and metric with a label.
        cmmd_features ([`FeatureExtractor`], *optional*): CLIP features for CMMD (default: `features`).
        cache_dir (`str`, *optional*): Where reference features are cached (keyed by folder content and model).
        fid_resamples (`int`, defaults to 100): Bootstrap resamples of the generated images for FID's interval.

    Returns:
        One row per set: `{"name", "options", "count", "metrics": {...}, "per_image": {...}}`.
    """
    pair_metrics = pair_metrics or {}
    unknown = [m for m in set_metrics if m not in SET_METRICS]
    if unknown:
        raise ValueError(f"Unknown set metric(s) {unknown}; allowed: {', '.join(SET_METRICS)}.")
    reference_features = None
    if set_metrics:
        if reference is None:
            raise ValueError(f"{'/'.join(m.upper() for m in set_metrics)} need --reference-images DIR.")
        if features is None:
            raise ValueError("FID/KID need a feature extractor.")
        reference_features = cached_reference_features(reference, features, cache_dir)
        cmmd_features = cmmd_features or features
        cmmd_reference = (
            cached_reference_features(reference, cmmd_features, cache_dir) if "cmmd" in set_metrics else None
        )
    rows = []
    for image_set in sets:
        images = image_set.images()
        row: dict[str, Any] = {
            "name": image_set.name,
            "options": image_set.options,
            "count": len(images),
            "metrics": {},
            "per_image": {},
        }
        for name, metric in pair_metrics.items():
            values = [float(v) for v in metric(images, image_set.prompts)]
            interval = clustered_mean_ci(image_set.prompts, values)
            row["metrics"][name] = {"mean": interval["mean"], "ci95": interval["ci95"], "prompts": interval["prompts"]}
            row["per_image"][name] = values
            if progress:
                progress(f"{image_set.name}: {name}")
        if set_metrics:
            feats = features(images)
            counts = {"generated": len(feats), "reference": len(reference_features)}
            if "fid" in set_metrics:
                fid = frechet_distance(reference_features, feats)
                low, high = fid_bootstrap_ci(reference_features, feats, fid_resamples)
                row["metrics"]["fid"] = {"value": fid, "ci95": [low, high], **counts}
                if min(counts.values()) < FID_MIN_IMAGES:
                    row["metrics"]["fid"]["warning"] = (
                        f"FID on {min(counts.values())} < {FID_MIN_IMAGES} images: biased upward, compare only with "
                        "FIDs on the same number of images"
                    )
                    logger.warning(f"{image_set.name}: {row['metrics']['fid']['warning']}.")
            if "prdc" in set_metrics:
                row["metrics"]["prdc"] = {
                    **precision_recall_density_coverage(reference_features, feats),
                    "nearest_k": 5,
                    **counts,
                }
            if "cmmd" in set_metrics:
                fake = feats if cmmd_features is features else cmmd_features(images)
                row["metrics"]["cmmd"] = {"value": cmmd(cmmd_reference, fake), **counts}
            if "kid" in set_metrics:
                size = resolve_kid_subset_size(len(reference_features), len(feats), kid_subset_size)
                mean, std = kernel_distance(reference_features, feats, kid_subsets, size)
                row["metrics"]["kid"] = {
                    "mean": mean,
                    "std": std,
                    "subset_size": size,
                    "subsets": kid_subsets,
                    **counts,
                }
            if progress:
                progress(f"{image_set.name}: {'/'.join(set_metrics)}")
        row["images"] = [str(p) for p in image_set.paths]
        row["prompts"] = list(image_set.prompts)
        row["seeds"] = list(image_set.seeds)
        rows.append(row)
    return rows
