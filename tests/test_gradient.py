"""The differentiable path of CLIP score: the same scores as the PIL path on images at the model's resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_tiny_clip_checkpoint
from PIL import Image

from headpag.eval import ClipScore


def test_clip_score_tensor_path_matches_the_pil_path_and_is_differentiable(tmp_path):
    config, checkpoint = write_tiny_clip_checkpoint(tmp_path, "tiny-clip-s3", seed=3)  # seed 3: every score > 0
    clip = ClipScore(str(config), checkpoint=checkpoint, device="cpu")
    assert clip.differentiable
    size, _, _ = clip._transform_parts()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a cat", "a red car", "a dog on grass"]
    pixels = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1) for im in images])
    pixels.requires_grad_(True)
    scores = clip(pixels, prompts)
    assert scores.shape == (3,)
    assert scores.tolist() == pytest.approx(clip(images, prompts), abs=1e-3)
    assert scores.requires_grad
    # The clamp at 0 (the metric's definition) stops the gradient of an image scored 0; the others get one.
    assert (scores > 1).all()
    scores.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    for i, score in enumerate(scores.tolist()):
        assert (pixels.grad[i].abs().sum() > 0) == (score > 0)
    # Other sizes are resized in torch (no PIL round trip): still one score per image, still differentiable.
    assert clip(torch.rand(2, 3, size * 2, size + 8), prompts[:2]).shape == (2,)
    with pytest.raises(ValueError, match="one prompt each"):
        clip(pixels.detach(), prompts[:2])


# ---------------------------------------------------------------------------------------------- strategy="gradient"
import json  # noqa: E402

from headpag import HeadSet  # noqa: E402
from headpag.models.tiny import tiny_sd3_components  # noqa: E402
from headpag.pipelines.sd3 import StableDiffusion3HeadPAGPipeline  # noqa: E402
from headpag.search import HeadHunter, SearchConfig  # noqa: E402
from headpag.search.gradient import head_gradients, objective_value  # noqa: E402
from headpag.search.strategies import rank  # noqa: E402


PLANTED = (5, 3)
SMALL = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16)
# The planted-head setup of test_strategies.py: 8 x 8 heads, 9 pairs; the gradient run has as many steps as a render.
SETTINGS = dict(
    prompts=[f"a photo of object {c}" for c in "abcdefghi"], seeds=list(range(9)), rounds=1, top_k=1, **SMALL
)


def differentiable(fn):
    fn.differentiable = True
    return fn


@differentiable
def brightness(images, prompts):
    if isinstance(images, torch.Tensor):
        return images.mean(dim=(1, 2, 3))
    return [float(np.asarray(im, np.float32).mean() / 255) for im in images]


class LastBlockRows:
    """Transformer rows (clean and perturbed) seen by the last block: the test's own count of forward work."""

    def __init__(self, transformer):
        self.block = transformer.transformer_blocks[-1]
        self.rows = 0

    def _hook(self, module, args, kwargs):
        self.rows += kwargs.get("hidden_states", args[0] if args else None).shape[0]

    def __enter__(self):
        self.handle = self.block.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def sd3(num_layers: int | None = None, num_heads: int | None = None, dtype=torch.float32):
    torch.manual_seed(0)
    sizes = {k: v for k, v in dict(num_layers=num_layers, num_heads=num_heads).items() if v is not None}
    pipe = StableDiffusion3HeadPAGPipeline(**tiny_sd3_components(**sizes))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def test_gradient_matches_finite_differences(tmp_path):
    pipe = sd3(dtype=torch.float64)  # float64: the finite differences are not drowned by rounding
    config = SearchConfig(prompts=["a cat"], seeds=[3], strategy="gradient", grad_steps=2, top_k=1, **SMALL)
    hunter = HeadHunter(pipe, brightness, config, tmp_path / "run")
    pool = hunter.pool()
    selected = [pool[1]]  # one head already selected: fixed at the identity weight, its layer's other heads free
    candidates = [h for h in pool if h not in selected]
    grads, cost = head_gradients(hunter, selected, candidates)
    # The decoded image is clamped to [0, 1]: the objective is only piecewise smooth in u, and on this model a
    # step of 1e-3 already crosses a kink (about 3% off); 1e-5 in float64 stays within one smooth piece.
    eps = 1e-5
    heads = [candidates[0], candidates[len(candidates) // 2], candidates[-1]]
    for head in heads:
        values = []
        for sign in (1, -1):
            u = torch.zeros(hunter.layout.num_layers, hunter.layout.num_heads, dtype=torch.float64)
            u[head] = sign * eps
            with torch.no_grad():
                values.append(float(objective_value(hunter, u, selected, candidates, "a cat", 3)))
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(grads[head]) > 1e-7, head
        assert grads[head] == pytest.approx(fd, rel=1e-2), head
    # One pair, 2 steps, 1 clean + 1 perturbed row per step; backward counts as two forwards.
    assert cost.row_evals == pytest.approx(2 * 2 * 3) and cost.images == 1


def test_a_non_differentiable_objective_is_refused(tmp_path):
    config = SearchConfig(prompts=["a cat"], strategy="gradient", **SMALL)
    with pytest.raises(ValueError, match=r"strategy='gradient' needs a differentiable objective.*'mean_pixel'"):

        def mean_pixel(images, prompts):
            return [0.0] * len(images)

        HeadHunter(sd3(), mean_pixel, config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="grad_steps must be"):
        SearchConfig(prompts=["a cat"], strategy="gradient", grad_steps=0)
    with pytest.raises(ValueError, match="prefilter_keep must be"):
        SearchConfig(prompts=["a cat"], strategy="gradient", prefilter_keep=0)
    # The gradient fields count in the hash (and config.json) only with strategy="gradient".
    base = SearchConfig(prompts=["a cat"], strategy="halving")
    assert base.config_hash() == SearchConfig(prompts=["a cat"], strategy="halving", grad_steps=7).config_hash()
    assert "grad_steps" not in base.to_dict()
    grad = SearchConfig(prompts=["a cat"], strategy="gradient")
    assert grad.config_hash() != SearchConfig(prompts=["a cat"], strategy="gradient", grad_steps=7).config_hash()
    assert SearchConfig.from_dict(grad.to_dict()) == grad and grad.kept_by_prefilter == 4 * grad.top_k


@pytest.fixture(scope="module")
def planted_setup(tmp_path_factory):
    """The 8 x 8 model and a differentiable planted objective: minus the mean absolute difference to the images
    rendered with `PLANTED` alone (as tensors in [0, 1]; PIL images are scored the same way)."""
    pipe = sd3(num_layers=8, num_heads=8)
    config = SearchConfig(**SETTINGS, strategy="gradient", grad_steps=2)
    maker = HeadHunter(pipe, brightness, config, tmp_path_factory.mktemp("refs") / "unused")
    images = maker.generate([(HeadSet([PLANTED]), p, s) for p, s in config.pairs()])
    refs = {
        p: torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
        for (p, _), im in zip(config.pairs(), images)
    }
    calls: list[int] = []

    @differentiable
    def objective(images, prompts):
        calls.append(len(images))
        if not isinstance(images, torch.Tensor):
            images = torch.stack(
                [torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1) for im in images]
            )
            return (-(images - torch.stack([refs[p] for p in prompts])).abs().mean(dim=(1, 2, 3))).tolist()
        return -(images - torch.stack([refs[p] for p in prompts])).abs().mean(dim=(1, 2, 3))

    return pipe, objective, calls


def test_gradient_strategy_recovers_the_planted_head_for_less(planted_setup, tmp_path):
    pipe, objective, calls = planted_setup
    config = SearchConfig(**SETTINGS, batch_size=32, strategy="gradient", grad_steps=2)
    hunter = HeadHunter(pipe, objective, config, tmp_path / "run")
    with LastBlockRows(pipe.transformer) as seen:
        result = hunter.run()
    assert result.order == [PLANTED]
    prefilter = result.rounds[0]["prefilter"]
    assert len(prefilter) == 64
    ranking = rank(prefilter, 64)
    print(f"\ngradient rank of the planted head: {ranking.index(PLANTED)} of 64; top 4 {ranking[:4]}")
    assert PLANTED in ranking[:4]  # kept by the default prefilter (4 * top_k)
    # The exact stage is successive halving over the 4 kept heads: 4 x 1 pair, 2 x 2 pairs, 1 x 6 pairs.
    stages = result.rounds[0]["stages"]
    assert [(len(s["candidates"]), s["pairs"]) for s in stages] == [(4, [0]), (2, [1, 2]), (1, [3, 4, 5, 6, 7, 8])]
    exact_images = 4 + 2 * 2 + 6
    # Cost: the test's forward rows; the journal's exact rows; the gradient pass's forward rows count three times.
    records = [json.loads(line) for line in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    exact_rows = sum(r["cost"]["row_evals"] for r in records)
    assert exact_rows == pytest.approx(exact_images * 2 * 2)
    gradient_rows = seen.rows - exact_rows
    assert gradient_rows == 9 * 2 * 2  # 9 pairs x 2 steps x (clean + perturbed)
    assert result.cost["row_evals"] == pytest.approx(exact_rows + 3 * gradient_rows)
    assert result.cost["images"] == exact_images + 9
    exhaustive_rows = 64 * 9 * 2 * 2
    print(f"row-evaluations gradient/exhaustive = {result.cost['row_evals']}/{exhaustive_rows}")
    assert result.cost["row_evals"] < exhaustive_rows / 10
    from headpag.search import write_report

    readme = (write_report(tmp_path / "run") / "README.md").read_text()
    assert "strategy `gradient`" in readme and "Gradient prefilter" in readme
    # Resume: the round and its gradient ranking are read back, nothing is rendered or differentiated again.
    calls.clear()
    again = HeadHunter(pipe, objective, config, tmp_path / "run").run()
    assert calls == [] and again.order == [PLANTED] and again.rounds[0]["prefilter"] == prefilter
    assert again.cost == result.cost
    # A tampered gradient file is recomputed (same values), the exact scores come from the journal.
    path = tmp_path / "run" / "rounds" / "round_0_gradients.json"
    doc = json.loads(path.read_text())
    doc["gradients"][0][2] = "x"
    path.write_text(json.dumps(doc))
    calls.clear()
    third = HeadHunter(pipe, objective, config, tmp_path / "run").run()
    assert calls == [1] * 9 and third.order == [PLANTED]  # the 9 differentiable renders, one pair each
    assert third.rounds[0]["prefilter"] == pytest.approx(prefilter)


def test_cli_flags_build_the_gradient_strategy():
    from headpag.cli import build_parser
    from headpag.cli.hunt import build_config

    args = build_parser().parse_args(
        ["hunt", "--model", "tiny-sd3", "--prompts", "a cat", "--strategy", "gradient", "--grad-steps", "3"]
        + ["--prefilter-keep", "12"]
    )
    config = build_config(args, "sd3")
    assert (config.strategy, config.grad_steps, config.prefilter_keep) == ("gradient", 3, 12)


@pytest.mark.parametrize(
    "model, extra",
    [
        ("tiny-sd3", dict(guidance_scale=5.0)),  # CFG
        ("tiny-sd35", {}),  # image-only attn2
        ("tiny-flux", dict(guidance_scale=3.5, negative_prompt="blurry", true_cfg_scale=2.0)),  # true CFG
    ],
)
def test_the_differentiable_render_is_the_pipelines_and_flux_gradients_match(model, extra, tmp_path):
    from headpag import load_pipeline
    from headpag.search.gradient import render, weight_matrix

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    config = SearchConfig(prompts=["a cat"], seeds=[1], strategy="gradient", grad_steps=2, top_k=1, **SMALL, **extra)
    hunter = HeadHunter(pipe, brightness, config, tmp_path / "run")
    layout, selected = hunter.layout, [hunter.pool()[-1]]
    image = hunter.generate([(HeadSet(selected), "a cat", 1)])[0]
    matrix = weight_matrix(layout.num_layers, layout.num_heads, selected, config.pag_identity_weight)
    with torch.no_grad():
        tensor = render(hunter, matrix, HeadSet(selected), "a cat", 1, 2)
    # The same image as the pipeline's, up to its uint8 rounding.
    assert np.abs(tensor[0].permute(1, 2, 0).numpy() * 255 - np.asarray(image, np.float32)).max() <= 0.51
    if model != "tiny-flux":
        return
    pipe.to(dtype=torch.float64)
    hunter._embeddings.clear()  # text embeddings of the float64 model
    candidates = hunter.pool()[:-1]
    grads, cost = head_gradients(hunter, selected, candidates)
    # 2 steps x (unconditional + conditional + perturbed) rows, backward as two forwards.
    assert cost.row_evals == pytest.approx(2 * 3 * 3)
    head, eps = max(candidates, key=lambda h: abs(grads[h])), 1e-5
    values = []
    for sign in (1, -1):
        u = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float64)
        u[head] = sign * eps
        with torch.no_grad():
            values.append(float(objective_value(hunter, u, selected, candidates, "a cat", 1)))
    assert grads[head] == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-2)


def test_step_checkpointing_gives_the_same_gradients(tmp_path):
    config = SearchConfig(prompts=["a cat"], seeds=[2], strategy="gradient", grad_steps=2, guidance_scale=4.0, **SMALL)
    hunter = HeadHunter(sd3(), brightness, config, tmp_path / "run")
    selected, candidates = hunter.pool()[:1], hunter.pool()[1:]
    plain, cost = head_gradients(hunter, selected, candidates, checkpoint=False)
    checkpointed, cost_checkpointed = head_gradients(hunter, selected, candidates, checkpoint=True)
    assert checkpointed == pytest.approx(plain, rel=1e-5, abs=1e-10)
    assert cost.row_evals == cost_checkpointed.row_evals == 2 * 3 * 3  # CFG: 2 clean + 1 perturbed rows per step
