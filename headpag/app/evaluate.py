"""Scoring for the UI: the session gallery or a folder, with the same metric classes and tables as `headpag eval`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..eval.compare import SET_METRICS, ImageSet, image_sets_from_folder, parse_metrics, score_sets
from .host import ModelHost


def gallery_sets(entries: Sequence[dict]) -> list[ImageSet]:
    """The gallery as two sets, "with PAG" and "without PAG" (same prompts and seeds)."""
    if not entries:
        raise ValueError("The gallery is empty: generate some images first, or score a folder.")
    prompts = [e["prompt"] for e in entries]
    seeds = [e["seed"] for e in entries]
    return [
        ImageSet("with PAG", [Path(e["pag_path"]) for e in entries], prompts, seeds),
        ImageSet("without PAG", [Path(e["nopag_path"]) for e in entries], prompts, seeds),
    ]


def evaluate_sets(
    host: ModelHost,
    sets: list[ImageSet],
    metrics: Sequence[str],
    clip_model: str = "ViT-L-14",
    clip_checkpoint: str | None = None,
    pickscore_model: str | None = None,
    reference_images: str | None = None,
    inception_weights: str | None = None,
) -> list[dict]:
    """Score `sets`; metric models are loaded once per app and reused."""
    from ..eval import ClipScore, InceptionFeatures, PickScore

    if not metrics:
        raise ValueError("Choose at least one metric: clip, pickscore, fid, kid.")
    metrics = parse_metrics(metrics)
    pair = {}
    if "clip" in metrics:
        key = ("clip", clip_model, clip_checkpoint)
        pair["clip"] = host.metric(key, lambda: ClipScore(clip_model, clip_checkpoint, device=host.device))
    if "pickscore" in metrics:
        model = pickscore_model or "yuvalkirstain/PickScore_v1"
        pair["pickscore"] = host.metric(("pickscore", model), lambda: PickScore(model, device=host.device))
    set_metrics = [m for m in metrics if m in SET_METRICS]
    features = None
    if set_metrics:
        if not reference_images:
            raise ValueError("FID/KID need a folder of reference images.")
        key = ("inception", inception_weights)
        features = host.metric(key, lambda: InceptionFeatures(inception_weights, device=host.device))
    kid_size = min(len(s.paths) for s in sets)
    return score_sets(sets, pair, features, set_metrics, reference_images, kid_subsets=50, kid_subset_size=kid_size)


def table(rows: list[dict]) -> list[list]:
    """Rows for a dataframe: configuration, images, then one `metric: value` cell per metric (as in report.md)."""
    from ..eval.report import format_metric

    return [[r["name"], r["count"], *(f"{m}: {format_metric(v)}" for m, v in r["metrics"].items())] for r in rows]


def folder_sets(folder: str, prompts_text: str) -> list[ImageSet]:
    prompts = [line.strip() for line in (prompts_text or "").splitlines() if line.strip()] or None
    return image_sets_from_folder(folder, prompts)


def load_eval_report(run_dir: str) -> tuple[str, list[tuple[Image.Image, str]]]:
    """The table of an `headpag eval` run's `report.md` and its plots and grids."""
    run = Path(run_dir or "")
    report = run / "report.md"
    if not report.is_file():
        raise ValueError(f"{run} holds no report.md; run `headpag eval ... --output-dir {run}` first.")
    text = report.read_text().split("\n## ")[0]
    pictures = [
        (Image.open(p).convert("RGB"), f"{p.parent.name}/{p.name}")
        for folder in ("plots", "grids")
        for p in sorted((run / folder).glob("*.png"))
    ]
    return text, pictures
