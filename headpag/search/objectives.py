"""HeadHunter objectives: `f(images, prompts) -> list[float]`, higher is better; loaded once per process."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image


Objective = Callable[[Sequence[Image.Image], Sequence[str]], Sequence[float]]


def load_objective(
    objective: str | Objective, model: str | None = None, arch: str | None = None, device=None
) -> Objective:
    r"""
    Args:
        objective (`str` or callable): `"clip"` (open_clip CLIP score), `"pickscore"`, `"shapes-judge"` (the shapes
            testbed's judge, differentiable), `"aesthetic"` (LAION; `model` is the head file, the CLIP ViT-L-14
            from `$HEADPAG_CLIP_CHECKPOINT`), `"hpsv2"` (`model` is the HPS checkpoint), `"imagereward"`
            (`model`: `ImageReward.pt`, `arch`: the BERT tokenizer), or any callable.
        model (`str`, *optional*): CLIP: a checkpoint file (`.safetensors` or a torch file, read with
            `weights_only=True`); PickScore: a local folder or hub id (default `yuvalkirstain/PickScore_v1`).
        arch (`str`, *optional*): CLIP: open_clip model name or config JSON (default `ViT-L-14`).
    """
    if callable(objective):
        return objective
    if objective == "clip":
        from ..eval import ClipScore

        return ClipScore(arch or "ViT-L-14", checkpoint=model, device=device)
    if objective == "pickscore":
        from ..eval import PickScore

        return PickScore(model or "yuvalkirstain/PickScore_v1", device=device)
    if objective == "aesthetic":
        from ..eval.preference import AestheticScore

        return AestheticScore(model, arch or "ViT-L-14", device=device)
    if objective == "hpsv2":
        from ..eval.preference import HPSv2Score

        return HPSv2Score(model, arch or "ViT-H-14", device=device)
    if objective == "imagereward":
        from ..eval.preference import ImageRewardScore

        return ImageRewardScore(model, arch or "bert-base-uncased", device=device)
    from ..eval.registry import load_pair_metric, pair_metric_names

    if objective in pair_metric_names():
        return load_pair_metric(objective, device=device)
    allowed = ", ".join(
        repr(n) for n in ("clip", "pickscore", "aesthetic", "hpsv2", "imagereward", *pair_metric_names())
    )
    raise ValueError(f"Unknown objective {objective!r}; allowed: {allowed}, or a callable.")
