"""Every HeadHunter strategy on a tiny FLUX of 8 layers (4 double-stream, 4 single-stream) x 8 heads with a planted
head: each recovers it; halving and the gradient prefilter cost at most a third of exhaustive's row-evaluations,
counted here with a forward pre-hook on the last single-stream block (clean and perturbed rows together)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headpag import FluxHeadPAGPipeline, HeadSet
from headpag.models.tiny import tiny_flux_components
from headpag.search import HeadHunter, SearchConfig


PLANTED = (5, 2)  # a single-stream layer
SETTINGS = dict(
    prompts=[f"a photo of object {c}" for c in "abcdefghi"],
    seeds=list(range(9)),
    rounds=1,
    top_k=1,
    num_inference_steps=2,
    height=32,
    width=32,
    max_sequence_length=16,
    guidance_scale=3.5,
    batch_size=32,
)


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    components = tiny_flux_components(num_layers=4, num_single_layers=4, num_heads=8, head_dim=16)
    pipe = FluxHeadPAGPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def planted(flux, tmp_path_factory):
    """Minus the mean absolute difference to the images rendered with `PLANTED` alone (differentiable on tensors)."""
    config = SearchConfig(**SETTINGS)
    maker = HeadHunter(flux, lambda i, p: [0.0] * len(i), config, tmp_path_factory.mktemp("refs") / "unused")
    images = maker.generate([(HeadSet([PLANTED]), p, s) for p, s in config.pairs()])
    refs = {
        p: torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
        for (p, _), im in zip(config.pairs(), images)
    }

    def objective(images, prompts):
        if isinstance(images, torch.Tensor):
            return -(images - torch.stack([refs[p] for p in prompts]).to(images)).abs().mean(dim=(1, 2, 3))
        tensors = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1) for im in images])
        return (-(tensors - torch.stack([refs[p] for p in prompts])).abs().mean(dim=(1, 2, 3))).tolist()

    objective.differentiable = True
    return objective


@pytest.fixture(scope="module")
def runs(flux, planted, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-strategies")
    out = {}
    for strategy, extra in {
        "exhaustive": {},
        "halving": {"strategy": "halving"},
        "gradient": {"strategy": "gradient", "grad_steps": 2},
    }.items():
        rows = []
        block = flux.transformer.single_transformer_blocks[-1]
        handle = block.register_forward_pre_hook(
            lambda m, args, kwargs, rows=rows: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
        )
        try:
            result = HeadHunter(flux, planted, SearchConfig(**SETTINGS, **extra), root / strategy).run()
        finally:
            handle.remove()
        out[strategy] = (result, sum(rows))
    return out


@pytest.mark.parametrize("strategy", ["exhaustive", "halving", "gradient"])
def test_every_strategy_recovers_the_planted_head_on_flux(runs, strategy):
    result, _ = runs[strategy]
    assert result.order == [PLANTED]


@pytest.mark.parametrize("strategy", ["halving", "gradient"])
def test_cheap_strategies_cost_at_most_a_third_on_flux(runs, strategy):
    exhaustive, exhaustive_rows = runs["exhaustive"]
    result, rows = runs[strategy]
    assert rows * 3 <= exhaustive_rows, (strategy, rows, exhaustive_rows)  # forward rows, counted here
    # the search's own count, in which a backward pass costs two forwards
    assert result.cost["row_evals"] * 3 <= exhaustive.cost["row_evals"], (result.cost, exhaustive.cost)
