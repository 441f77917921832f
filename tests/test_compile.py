"""
Compiled PAG: one graph and no graph break per transformer call, `fullgraph=True` compiles (whole transformer, SD3
blocks, FLUX repeated blocks) that equal eager, nothing new compiled after the warm-up, and no host reads beyond the
stock pipeline's. Graph counts use `backend="eager"` (dynamo only); one inductor test per family is marked slow.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS, make_inputs, make_transformer
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode

from headpag import HeadSet, head_pag
from headpag.guidance import Perturbation
from headpag.models.tiny import tiny_flux_components, tiny_sd3_components
from headpag.runtime import CallPlan, PerturbedCall, activated, describe_transformer, ensure_hooks


COMMON = dict(num_inference_steps=2, height=32, width=32, output_type="latent", max_sequence_length=32)


def direct_plan(transformer, sequential: bool = False) -> CallPlan:
    layout = describe_transformer(transformer)
    heads = HeadSet.parse("1.0, 2").resolve(layout.num_layers, layout.num_heads)
    decide = lambda kwargs, state: PerturbedCall([1], 1.0)  # noqa: E731
    plan = CallPlan(layout, [heads], Perturbation(0.7), decide, sequential=sequential)
    ensure_hooks(plan)
    return plan


@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_one_graph_and_no_break_per_pag_transformer_call(kind):
    torch._dynamo.reset()
    transformer = make_transformer(kind)
    with activated(direct_plan(transformer)):
        explained = torch._dynamo.explain(transformer)(**make_inputs(kind))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("how", ["fullgraph", "blocks"])
@pytest.mark.parametrize("sequential", [False, True])
@torch.no_grad()
def test_fullgraph_compiles_equal_eager(kind, how, sequential):
    """`torch.compile(transformer, fullgraph=True)`; per-block `fullgraph` compiles (SD3 blocks, FLUX's
    `compile_repeated_blocks`) run with PAG active and give eager PAG's clean and perturbed rows."""
    torch._dynamo.reset()
    transformer = make_transformer(kind)
    plan = direct_plan(transformer, sequential)
    kwargs = make_inputs(kind)
    with activated(plan) as state:
        eager, eager_p = transformer(**kwargs)[0], state.perturbed
    if how == "fullgraph":
        compiled = torch.compile(transformer, backend="eager", fullgraph=True)
    elif kind == "flux":
        transformer.compile_repeated_blocks(backend="eager", fullgraph=True)
        compiled = transformer
    else:
        for block in describe_transformer(transformer).blocks:
            block.compile(backend="eager", fullgraph=True)
        compiled = transformer
    for _ in range(2):
        with activated(plan) as state:
            out, perturbed = compiled(**kwargs)[0], state.perturbed
        torch.testing.assert_close(out, eager, atol=1e-6, rtol=0)
        torch.testing.assert_close(perturbed, eager_p, atol=1e-6, rtol=0)
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]


def family(name: str):
    if name == "sd3":
        return StableDiffusion3Pipeline(**tiny_sd3_components()), dict(guidance_scale=4.0), dict(guidance_scale=1.0)
    return FluxPipeline(**tiny_flux_components()), dict(negative_prompt="blur", true_cfg_scale=2.0), {}


@pytest.mark.parametrize("name", ["sd3", "flux"])
@torch.no_grad()
def test_nothing_compiles_after_the_warm_up(name):
    """Warm-up: one call with CFG and one without, each with a step inside and one outside the PAG interval. Then new
    `u`, `pag_scale` and heads within the same layers (same count per layer) compile nothing, and equal eager."""
    torch._dynamo.reset()
    counters.clear()
    pipe, cfg, no_cfg = family(name)
    pipe.set_progress_bar_config(disable=True)
    eager = {}
    later = [(cfg, dict(pag_identity_weight=0.3)), (no_cfg, dict(pag_scale=1.5)), (cfg, dict(pag_heads="1.1, 2"))]
    for i, (guidance, options) in enumerate(later):
        with head_pag(pipe, **{"pag_heads": "1.0, 2", **options}):
            eager[i] = pipe("a cat", **COMMON, **guidance, generator=torch.Generator().manual_seed(0)).images
    pipe.transformer = torch.compile(pipe.transformer, backend="eager", fullgraph=True)
    for guidance in (cfg, no_cfg):
        with head_pag(pipe, pag_heads="1.0, 2", pag_interval=(0.0, 0.5)):
            pipe("a cat", **COMMON, **guidance, generator=torch.Generator().manual_seed(0))
    warm = counters["stats"]["unique_graphs"]
    for i, (guidance, options) in enumerate(later):
        with head_pag(pipe, **{"pag_heads": "1.0, 2", **options}):
            got = pipe("a cat", **COMMON, **guidance, generator=torch.Generator().manual_seed(0)).images
        torch.testing.assert_close(got, eager[i], atol=1e-6, rtol=0)
    assert warm > 0 and counters["stats"]["unique_graphs"] == warm


HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
}


class HostReads(TorchFunctionMode):
    """Counts the five ways a tensor's value reaches Python."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("options", [{}, {"pag_sequential": True}, {"pag_interval": (0.0, 0.5)}])
@torch.no_grad()
def test_host_reads_equal_the_stock_pipelines(name, options):
    pipe, cfg, _ = family(name)
    pipe.set_progress_bar_config(disable=True)
    stock = HostReads()
    with stock:
        pipe("a cat", **COMMON, **cfg, generator=torch.Generator().manual_seed(0))
    pag = HostReads()
    with head_pag(pipe, pag_heads="1.0, 2", **options):
        with pag:
            pipe("a cat", **COMMON, **cfg, generator=torch.Generator().manual_seed(0))
    assert pag.count == stock.count


@pytest.mark.slow
@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_inductor_equals_eager_within_the_stock_models_own_difference(kind):
    torch._dynamo.reset()
    transformer = make_transformer(kind)
    kwargs = make_inputs(kind)
    stock_eager = transformer(**kwargs)[0]
    plan = direct_plan(transformer)
    with activated(plan) as state:
        eager, eager_p = transformer(**kwargs)[0], state.perturbed
    compiled = torch.compile(transformer, fullgraph=True)
    stock_compiled = compiled(**kwargs)[0]
    with activated(plan) as state:
        out, perturbed = compiled(**kwargs)[0], state.perturbed
    tolerance = max(float((stock_compiled - stock_eager).abs().max()), 1e-6) * 4
    assert float((out - eager).abs().max()) <= tolerance
    assert float((perturbed - eager_p).abs().max()) <= tolerance
