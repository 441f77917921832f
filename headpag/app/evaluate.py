"""
Scoring for the UI: the session gallery or a folder of the eval root, with the same metric classes and tables as
`headpag eval`; and `headpag eval` reports of the eval root, by run name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffusers.utils import logging
from PIL import Image

from ..eval.scoring import SET_METRICS, ImageSet, image_sets_from_folder, parse_metrics, score_sets
from ..options import Limits
from .host import ModelHost
from .roots import Roots


logger = logging.get_logger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_REPORT_BYTES = 1 << 20
MAX_REPORT_PICTURES = 64


def gallery_sets(entries: Sequence[dict], roots: Roots | None = None) -> list[ImageSet]:
    """The gallery as two sets, "with PAG" and "without PAG" (same prompts and seeds); its files must be outputs."""
    if not entries:
        raise ValueError("The gallery is empty: generate some images first, or score a folder.")
    paths = [[Path(e["pag_path"]) for e in entries], [Path(e["nopag_path"]) for e in entries]]
    if roots is not None:
        paths = [[roots.contain("output", p, "gallery image") for p in group] for group in paths]
    prompts = [e["prompt"] for e in entries]
    seeds = [e["seed"] for e in entries]
    return [ImageSet("with PAG", paths[0], prompts, seeds), ImageSet("without PAG", paths[1], prompts, seeds)]


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
    r"""
    Score `sets`; metric models are loaded once per app and reused (a few at most).

    Args:
        host ([`ModelHost`]): Holds the metric models.
        sets (`list[ImageSet]`): What to score.
        metrics (`list[str]`): Any of [`~eval.scoring.metric_names`] (`aesthetic` and `hpsv2` take their weights
            from the server's `$HEADPAG_AESTHETIC_HEAD` / `$HEADPAG_HPS_CHECKPOINT`).
        clip_model, clip_checkpoint, pickscore_model, reference_images, inception_weights (`str`, *optional*):
            Already resolved by the caller (names checked against the server's roots).
    """
    from ..eval import ClipScore, InceptionFeatures, PickScore

    if not metrics:
        raise ValueError("Choose at least one metric: clip, pickscore, fid, kid.")
    metrics = parse_metrics(metrics)
    pair = {}
    if "clip" in metrics:
        key = ("clip", clip_model, clip_checkpoint)
        pair["clip"] = host.metric(
            key, lambda: _load("CLIP model", lambda: ClipScore(clip_model, clip_checkpoint, device=host.device))
        )
    if "pickscore" in metrics:
        model = pickscore_model or "yuvalkirstain/PickScore_v1"
        pair["pickscore"] = host.metric(
            ("pickscore", model), lambda: _load("PickScore model", lambda: PickScore(model, device=host.device))
        )
    if "aesthetic" in metrics:  # the head file is the server's ($HEADPAG_AESTHETIC_HEAD), never a client's path
        from ..eval.preference import AestheticScore

        pair["aesthetic"] = host.metric(
            ("aesthetic", clip_model, clip_checkpoint),
            lambda: _load(
                "aesthetic model", lambda: AestheticScore(None, clip_model, clip_checkpoint, device=host.device)
            ),
        )
    if "hpsv2" in metrics:  # $HEADPAG_HPS_CHECKPOINT on the server
        from ..eval.preference import HPSv2Score

        pair["hpsv2"] = host.metric(("hpsv2",), lambda: _load("HPSv2 model", lambda: HPSv2Score(device=host.device)))
    if "imagereward" in metrics:  # $HEADPAG_IMAGEREWARD_CHECKPOINT on the server
        from ..eval.preference import ImageRewardScore

        pair["imagereward"] = host.metric(
            ("imagereward",), lambda: _load("ImageReward model", lambda: ImageRewardScore(device=host.device))
        )
    from ..eval.registry import load_pair_metric, pair_metric_names

    for name in pair_metric_names():
        if name in metrics:
            pair[name] = host.metric(
                (name,), lambda name=name: _load(name, lambda: load_pair_metric(name, host.device))
            )
    set_metrics = [m for m in metrics if m in SET_METRICS]
    features = None
    if set_metrics:
        if not reference_images:
            raise ValueError("FID/KID need a folder of reference images.")
        key = ("inception", inception_weights)
        features = host.metric(
            key,
            lambda: _load("Inception model", lambda: InceptionFeatures(inception_weights, device=host.device)),
        )
    kid_size = min(len(s.paths) for s in sets)
    return score_sets(sets, pair, features, set_metrics, reference_images, kid_subsets=50, kid_subset_size=kid_size)


def _load(what: str, factory):
    """Load a metric model; a failure is reported by type only (loading errors can quote the files read)."""
    try:
        return factory()
    except ValueError as e:
        logger.warning("could not load the %s: %s", what, e)
        raise ValueError(f"Could not load the {what}: {_first_line(str(e))}") from None
    except Exception as e:  # noqa: BLE001 - reported without its message
        logger.warning("could not load the %s: %r", what, e)
        raise ValueError(f"Could not load the {what} ({type(e).__name__}; the server log has the details).") from None


def _first_line(text: str) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= 200 else line[:197] + "..."


def table(rows: list[dict]) -> list[list]:
    """Rows for a dataframe: configuration, images, then one `metric: value` cell per metric (as in report.md)."""
    from ..eval.report import format_metric

    return [[r["name"], r["count"], *(f"{m}: {format_metric(v)}" for m, v in r["metrics"].items())] for r in rows]


def _images(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError:
        return []


def image_folders(roots: Roots) -> list[str]:
    """Folders of the eval root that hold images (directly or in sub-folders)."""

    def has_images(path: Path) -> bool:
        if not path.is_dir():
            return False
        if _images(path):
            return True
        try:
            return any(d.is_dir() and _images(d) for d in list(path.iterdir())[:1000])
        except OSError:
            return False

    return roots.names("eval", folder=True, predicate=has_images)


def report_runs(roots: Roots) -> list[str]:
    """Folders of the eval root that hold a `report.md` (`headpag eval` runs)."""
    return roots.names("eval", folder=True, predicate=lambda p: (p / "report.md").is_file())


def folder_sets(roots: Roots, name: str, prompts: Sequence[str] | None, limits: Limits) -> list[ImageSet]:
    r"""
    The image sets of a folder of the eval root (a folder of images, or of sub-folders of images).

    Args:
        roots ([`Roots`]): The server's roots. name (`str`): The folder's name.
        prompts (`list[str]`, *optional*): For images without prompt metadata (one per image, in name order).
        limits ([`Limits`]): At most `max_prompts` images per set.
    """
    folder = roots.path("eval", name, "image folder", folder=True)
    roots.check_tree("eval", folder, f"image folder {name!r}")
    subdirs = [d for d in sorted(folder.iterdir()) if d.is_dir() and _images(d)]
    if subdirs and _images(folder):
        raise ValueError(
            f"Image folder {name!r} holds images beside sub-folders of images; score a folder of images or a folder "
            "of sub-folders (one set each): move the top-level images into a sub-folder."
        )
    for d in subdirs or [folder]:
        count = len(_images(d))
        if not count:
            raise ValueError(f"Image folder {name!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        limits.check_count(f"images in {name!r}", count, "max_prompts")
    try:
        sets = image_sets_from_folder(folder, list(prompts) if prompts else None)
    except ValueError as e:
        raise ValueError(roots.redact(str(e))) from None
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(
            f"Image folder {name!r} holds a file that is not a readable image ({type(e).__name__})."
        ) from None
    return sets


def reference_folder(roots: Roots, name: str | None) -> str | None:
    """A folder of reference images of the eval root (FID/KID), by name."""
    if not name:
        return None
    folder = roots.path("eval", name, "reference image folder", folder=True)
    roots.check_tree("eval", folder, f"reference image folder {name!r}")
    return str(folder)


def load_eval_report(roots: Roots, name: str) -> tuple[str, list[tuple[Image.Image, str]]]:
    r"""
    The table of an `headpag eval` run's `report.md` and its plots and grids, from a folder of the eval root.

    Args:
        roots ([`Roots`]): The server's roots. name (`str`): The run's folder name.

    Raises:
        `ValueError`: when the run is not in the eval root or is not a readable report (nothing from its files is
        quoted).
    """
    run = roots.path("eval", name, "eval run", folder=True)
    roots.check_tree("eval", run, f"eval run {name!r}")
    invalid = ValueError(f"Eval run {name!r} is not a valid `headpag eval` run folder (no readable report.md).")
    report = run / "report.md"
    try:
        if not report.is_file() or report.stat().st_size > MAX_REPORT_BYTES:
            raise invalid
        text = report.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        raise invalid from None
    text = roots.redact(text.split("\n## ")[0])
    pictures = []
    for folder in ("plots", "grids"):
        for p in sorted((run / folder).glob("*.png"))[:MAX_REPORT_PICTURES]:
            try:
                roots.contain("eval", p, "report picture")
                with Image.open(p) as im:
                    if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                        continue
                    pictures.append((im.convert("RGB"), f"{p.parent.name}/{p.name}"))
            except (OSError, ValueError, Image.DecompressionBombError):
                logger.warning("skipped an unreadable report picture in eval run %s", name)
    return text, pictures


__all__ = [
    "evaluate_sets",
    "folder_sets",
    "gallery_sets",
    "image_folders",
    "load_eval_report",
    "reference_folder",
    "report_runs",
    "table",
]
