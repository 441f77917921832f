"""
Rendering, measuring and searching for the testbed experiments (`testbed_experiments.py`): cached images, per-image
measures, paired comparisons and HeadHunter runs.

Every image is cached by configuration, prompt and seed (`OUT/images/NAME/`, with the settings it was made with; a
folder whose settings differ is refused, not reused) and every measure of it in `scores.json` beside it.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from headpag.eval.paired import clustered_mean_ci, paired_difference
from headpag.models import load_pipeline
from headpag.runtime import describe_transformer
from headpag.search import HeadHunter, SearchConfig
from headpag.search.records import journal_cost
from headpag.search.rundir import RunDirectory
from headpag.testbed.data import ATTRIBUTES, HALF, IMAGE_SIZE, parse_prompt
from headpag.testbed.judge import ShapesJudgeScore
from headpag.testbed.structure import structure


MEASURES = (
    "all_right", "judge", "structure", "iou", "stray", "size", "luminance", "saturation",
    *(f"attr:{name}" for name in ATTRIBUTES),
)  # fmt: skip
BATCH = 16
_JUDGE: ShapesJudgeScore | None = None


def head_spec(heads) -> str:
    """`[[layer, head], ...]` as a head spec, `"3.6, 8.3"`, in the given order (a search's selection order)."""
    return ", ".join(f"{layer}.{head}" for layer, head in heads)


def judge() -> ShapesJudgeScore:
    global _JUDGE
    if _JUDGE is None:
        _JUDGE = ShapesJudgeScore()
    return _JUDGE


def measure(image: Image.Image, prompt: str) -> dict[str, float]:
    """The measures of one image that need no judge: structure, fitted size, luminance and saturation."""
    scene = parse_prompt(prompt)
    fit = structure(image, prompt)
    halves = [HALF[scene.size] if not scene.two else HALF["pair"]] * len(fit.objects)
    sizes = [o.half / h for o, h in zip(fit.objects, halves) if o.pixels > 0]
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    luminance = float((pixels @ np.array([0.299, 0.587, 0.114])).mean())
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels.reshape(-1, 3)[::4]])
    return {
        "structure": fit.iou - fit.stray,
        "iou": fit.iou,
        "stray": fit.stray,
        "size": float(np.mean(sizes)) if sizes else float("nan"),
        "luminance": luminance,
        "saturation": float(hsv[:, 1].mean()),
    }


def score(images: list[Image.Image], prompts: list[str]) -> list[dict[str, float]]:
    """Every measure of `MEASURES` per image (`nan` where it does not apply, e.g. an attribute the prompt omits)."""
    correct = judge().correct(images, prompts)
    logp = judge().score(images, prompts)
    rows = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        row = {"judge": logp[i], **measure(image, prompt)}
        named = {name: correct[name][i] for name in ATTRIBUTES}
        row["all_right"] = float(all(v is not False for v in named.values()))
        row.update({f"attr:{k}": float("nan") if v is None else float(v) for k, v in named.items()})
        rows.append(row)
    return rows


def paired(baseline: dict, row: dict, metric: str, resamples: int = 9999) -> dict[str, Any]:
    """`row - baseline` on `metric` over the pairs where both are defined (see `paired_difference`)."""
    keep = [
        i for i, (a, b) in enumerate(zip(baseline["per_image"][metric], row["per_image"][metric]))
        if np.isfinite(a) and np.isfinite(b)
    ]  # fmt: skip
    if not keep:
        return {"difference": float("nan"), "ci95": [float("nan")] * 2, "p_wilcoxon": 1.0, "pairs": 0}

    def subset(r):
        return {"name": r["name"], "prompts": [r["prompts"][i] for i in keep], "seeds": [r["seeds"][i] for i in keep],
                "per_image": {metric: [r["per_image"][metric][i] for i in keep]}}  # fmt: skip

    return paired_difference(subset(baseline), subset(row), metric, resamples=resamples)


def weights_id(pipe) -> str:
    """A short hash of every network that shapes an image (so a cache never mixes images of other weights)."""
    digest = hashlib.sha1()
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        for key, value in sorted(module.state_dict().items()) if module is not None else ():
            digest.update(key.encode())
            digest.update(value.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


class Renderer:
    r"""
    Renders and measures prompt-seed pairs with one loaded pipeline, caching both.

    Args:
        model (`str`): A model name or folder.
        out (`Path`): The cache folder.
        steps (`int`): Denoising steps.
        text_tokens (`int`, *optional*): T5's `max_sequence_length` (default the pipeline's: 256 for SD3, 512 for
            FLUX). Both testbed models are trained for any length that leaves one zero pad after the prompt.
    """

    def __init__(self, model: str, out: Path, steps: int, text_tokens: int | None = None):
        self.model, self.out, self.steps, self.text_tokens = model, Path(out), steps, text_tokens
        self.pipe = load_pipeline(model)
        self.pipe.set_progress_bar_config(disable=True)
        layout = describe_transformer(self.pipe.transformer)
        self.num_layers, self.num_heads, self.family = layout.num_layers, layout.num_heads, layout.family
        self.rendered = 0
        self.weights = weights_id(self.pipe)

    def pool(self, spec: str | None) -> list[tuple[int, int]]:
        return SearchConfig(prompts=["x"], pool=spec).pool_heads(self.num_layers, self.num_heads)

    def settings(self, **values: Any) -> dict[str, Any]:
        """The call's settings, every PAG value explicit (so the model's recommended defaults never leak in)."""
        base = dict(guidance_scale=1.0, pag_scale=0.0, pag_heads=None, pag_identity_weight=1.0)
        base.update(values)
        if base["pag_scale"] == 0:
            base.update(pag_heads=None, pag_identity_weight=1.0)
        if self.text_tokens is not None:
            base["max_sequence_length"] = self.text_tokens
        return {**base, "steps": self.steps, "size": IMAGE_SIZE, "weights": self.weights}

    def render(self, name: str, items: tuple[list[str], list[int]], **values: Any) -> dict[str, Any]:
        """Images and measures of configuration `name` on `items` (prompts, seeds), rendering what is not cached.

        Returns a row: `{"name", "prompts", "seeds", "per_image": {measure: [...]}, "summary", "images"}`."""
        settings = self.settings(**values)
        folder = self.out / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        saved = folder / "settings.json"
        if saved.exists() and json.loads(saved.read_text()) != settings:
            raise ValueError(f"{folder} holds images made with other settings; remove it or rename the configuration.")
        saved.write_text(json.dumps(settings, sort_keys=True))
        scores_file = folder / "scores.json"
        scores = json.loads(scores_file.read_text()) if scores_file.exists() else {}
        prompts, seeds = items
        files = [f"{hashlib.sha1(p.encode()).hexdigest()[:12]}-{s}.png" for p, s in zip(prompts, seeds)]
        todo = [i for i, f in enumerate(files) if f not in scores or not (folder / f).is_file()]
        for start in range(0, len(todo), BATCH):
            chunk = todo[start : start + BATCH]
            images = self._generate([prompts[i] for i in chunk], [seeds[i] for i in chunk], settings)
            for i, image, row in zip(chunk, images, score(images, [prompts[i] for i in chunk])):
                image.save(folder / files[i])
                scores[files[i]] = row
            scores_file.write_text(json.dumps(scores))
            self.rendered += len(chunk)
        per_image = {m: [scores[f][m] for f in files] for m in MEASURES}
        summary = {m: clustered_mean_ci(prompts, per_image[m], resamples=1999) for m in ("all_right", "structure",
                   "judge", "size", "luminance")}  # fmt: skip
        paths = [str(folder / f) for f in files]
        return {"name": name, "prompts": prompts, "seeds": seeds, "per_image": per_image, "summary": summary,
                "images": paths}  # fmt: skip

    def _generate(self, prompts: list[str], seeds: list[int], settings: dict) -> list[Image.Image]:
        pag = {"pag_scale": settings["pag_scale"], "pag_identity_weight": settings["pag_identity_weight"]}
        if settings["pag_heads"] is not None:
            pag["pag_heads"] = settings["pag_heads"]
        if self.family == "flux":
            # CFG is FLUX's true CFG against the empty prompt
            g = settings["guidance_scale"]
            guidance = dict(true_cfg_scale=g, negative_prompt="") if g > 1 else {}
        else:
            guidance = dict(guidance_scale=settings["guidance_scale"])
        if "max_sequence_length" in settings:
            guidance["max_sequence_length"] = settings["max_sequence_length"]
        return self.pipe(
            prompt=prompts,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            num_inference_steps=settings["steps"],
            height=settings["size"],
            width=settings["size"],
            **guidance,
            **pag,
        ).images


def search(r: Renderer, name: str, objective, items, sizes, strategy: str = "exhaustive", top_k: int = 4, **options):
    """One HeadHunter round with CFG off (the paper's search setting); resumes a finished or stopped run."""
    prompts, seeds = items
    config = SearchConfig(
        prompts=prompts, seeds=seeds, pairing="zip", rounds=1, top_k=top_k, pool=sizes.head_pool, pag_scale=3.0,
        guidance_scale=1.0, num_inference_steps=r.steps, height=IMAGE_SIZE, width=IMAGE_SIZE,
        max_sequence_length=r.text_tokens,
        batch_size=BATCH, strategy=strategy, **options,
    )  # fmt: skip
    folder = r.out / "search" / name
    result = HeadHunter(r.pipe, objective, config, folder, model_name=r.model).run()
    cost = journal_cost(RunDirectory(folder).read_journal())
    return {"heads": [list(h) for h in result.order], "row_evals": cost.row_evals, "images": cost.images,
            "seconds": cost.seconds, "strategy": strategy, **options}  # fmt: skip
