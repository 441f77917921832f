"""The fused head-level processors: stock equality, explicit-map equality, diffusers PAG equality, isolation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_transformer
from diffusers.models.attention_processor import JointAttnProcessor2_0, PAGJointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from headpag import HeadSet, Perturbation
from headpag.guidance import PerturbationPlan
from headpag.runtime import describe_transformer, perturbed_forward
from headpag.testing.explicit import ExplicitMapState
from headpag.testing.processors import HeadPAGFluxAttnProcessor, HeadPAGJointAttnProcessor, reference_forward
from headpag.testing.state import PerturbationState


ATOL = 1e-5  # float32: the fused and explicit forms reorder the same sums


def attention_cases(kind, transformer, batch=3, seed=0):
    """(label, attention module, layer, call kwargs, stock processor, our processor factory) for every attention."""
    g = torch.Generator().manual_seed(seed)
    layout = describe_transformer(transformer)
    dim = layout.num_heads * layout.attentions[0][0].to_q.weight.shape[0] // layout.num_heads
    cases = []
    if kind != "flux":
        for layer, attns in enumerate(layout.attentions):
            for j, attn in enumerate(attns):
                kwargs = {"hidden_states": torch.randn(batch, 64, dim, generator=g)}
                if j == 0:
                    kwargs["encoder_hidden_states"] = torch.randn(batch, 12, dim, generator=g)
                cases.append((f"L{layer}.attn{'2' if j else ''}", attn, layer, kwargs, JointAttnProcessor2_0(), None))
        return cases
    inputs = make_inputs("flux", batch=1)
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]])
    rotary = transformer.pos_embed(ids)
    for layer, (attn,) in enumerate(layout.attentions):
        if layout.layer_kind(layer) == "double":
            kwargs = {
                "hidden_states": torch.randn(batch, 64, dim, generator=g),
                "encoder_hidden_states": torch.randn(batch, 8, dim, generator=g),
                "image_rotary_emb": rotary,
            }
        else:
            kwargs = {"hidden_states": torch.randn(batch, 72, dim, generator=g), "image_rotary_emb": rotary}
        cases.append((f"L{layer}", attn, layer, kwargs, FluxAttnProcessor(), 8))
    return cases


def our_processor(kind, layer, state):
    return HeadPAGJointAttnProcessor(layer, state) if kind != "flux" else HeadPAGFluxAttnProcessor(layer, state)


def resolve(transformer, spec):
    layout = describe_transformer(transformer)
    return HeadSet.coerce(spec).resolve(layout.num_layers, layout.num_heads)


def call(attn, processor, kwargs):
    out = processor(attn, **kwargs)
    return out if isinstance(out, tuple) else (out,)


@torch.no_grad()
def test_clean_rows_equal_stock_processors(model_kind):
    """torch.equal: our processors run the same ops as diffusers' for every row that is not perturbed."""
    transformer = make_transformer(model_kind)
    num_heads = describe_transformer(transformer).num_heads
    for label, attn, layer, kwargs, stock, text_len in attention_cases(model_kind, transformer):
        expected = call(attn, stock, kwargs)
        state = PerturbationState()
        state.text_len = text_len
        got = call(attn, our_processor(model_kind, layer, state), kwargs)  # no plan at all
        for e, o in zip(expected, got):
            assert torch.equal(e, o), label
        heads = HeadSet([(layer, 0), (layer, num_heads - 1)])
        state.plan = PerturbationPlan([2], [heads], Perturbation(0.7), num_heads)  # row 2 perturbed
        got = call(attn, our_processor(model_kind, layer, state), kwargs)
        for e, o in zip(expected, got):
            assert torch.equal(e[:2], o[:2]), label
            assert not torch.allclose(e[2], o[2]), label


@torch.no_grad()
def test_u_zero_changes_nothing(model_kind):
    transformer = make_transformer(model_kind)
    num_heads = describe_transformer(transformer).num_heads
    for label, attn, layer, kwargs, _, text_len in attention_cases(model_kind, transformer):
        for scope in ("joint", "image"):
            for target in ("identity", "uniform", "query_mean"):
                state = PerturbationState()
                state.text_len = text_len
                clean = call(attn, our_processor(model_kind, layer, state), kwargs)
                all_heads = HeadSet([layer]).resolve(layer + 1, num_heads)
                state.plan = PerturbationPlan([0, 1, 2], [all_heads] * 3, Perturbation(0.0, scope, target), num_heads)
                got = call(attn, our_processor(model_kind, layer, state), kwargs)
                for c, o in zip(clean, got):
                    assert torch.equal(c, o), (label, scope, target)


HEAD_SETS = {
    "sd3": ["0.1", "1, 3.2", "0.0, 1.3, 2.1, 3.0-3"],
    "sd35": ["0.1", "1, 2.2", "0.0-1, 2.3, 3"],
    "flux": ["0.1", "1, 2.2", "0.0, 1.3, 2.1, 3.0-3"],
}


@pytest.mark.parametrize("u", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("scope", ["joint", "image"])
@torch.no_grad()
def test_fused_equals_explicit_attention_map(model_kind, u, scope):
    """The hook runtime (SoftPAG inside the stock processors) equals the processors that materialise the L x L maps,
    and the processor-swapping reference."""
    transformer = make_transformer(model_kind)
    kwargs = make_inputs(model_kind, batch=2)
    clean = transformer(**kwargs)[0]
    for spec in HEAD_SETS[model_kind]:
        heads = resolve(transformer, spec)
        _, fused = perturbed_forward(transformer, kwargs, [0, 1], [heads], Perturbation(u, scope))
        explicit = reference_forward(transformer, kwargs, [heads], Perturbation(u, scope), ExplicitMapState())[0]
        swapped = reference_forward(transformer, kwargs, [heads], Perturbation(u, scope))[0]
        msg = f"{model_kind} {spec} u={u} {scope}"
        torch.testing.assert_close(fused, explicit, atol=ATOL, rtol=0, msg=msg)
        torch.testing.assert_close(fused, swapped, atol=ATOL, rtol=0, msg=msg)
        if u > 0:
            assert not torch.allclose(fused, clean, atol=1e-4), spec
        else:
            torch.testing.assert_close(fused, clean, atol=ATOL, rtol=0)


@pytest.mark.parametrize("target", ["uniform", "query_mean"])
@torch.no_grad()
def test_other_targets_equal_explicit_maps(model_kind, target):
    transformer = make_transformer(model_kind)
    kwargs = make_inputs(model_kind, batch=1)
    heads = resolve(transformer, "0.1, 1, 3.0")
    perturbation = Perturbation(0.6, target=target)
    _, fused = perturbed_forward(transformer, kwargs, [0], [heads], perturbation)
    explicit = reference_forward(transformer, kwargs, [heads], perturbation, ExplicitMapState())[0]
    torch.testing.assert_close(fused, explicit, atol=ATOL, rtol=0)


@torch.no_grad()
def test_image_scope_equals_diffusers_pag_processor():
    """Plain SD3, u=1, whole layer, image scope == diffusers' PAGJointAttnProcessor2_0 perturbed half."""
    transformer = make_transformer("sd3")
    num_heads = describe_transformer(transformer).num_heads
    for label, attn, layer, kwargs, _, _ in attention_cases("sd3", transformer, batch=1):
        doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}
        expected = call(attn, PAGJointAttnProcessor2_0(), doubled)
        state = PerturbationState()
        all_heads = HeadSet([layer]).resolve(layer + 1, num_heads)
        state.plan = PerturbationPlan([1], [all_heads], Perturbation(1.0, "image"), num_heads)
        got = call(attn, our_processor("sd3", layer, state), doubled)
        for e, o in zip(expected, got):
            torch.testing.assert_close(o, e, atol=ATOL, rtol=0, msg=label)


@torch.no_grad()
def test_one_head_changes_only_that_head():
    state = PerturbationState()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 20, 8, generator=g) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for scope in ("joint", "image"):
        state.plan = PerturbationPlan([1], [HeadSet([(5, 2)])], Perturbation(0.5, scope), num_heads=4)
        out = state.apply(5, sdpa, q, k, v, image=slice(0, 16), text=slice(16, 20))
        changed = (out != sdpa).any(dim=(2, 3))
        assert changed.nonzero().tolist() == [[1, 2]], scope
        assert state.apply(4, sdpa, q, k, v, image=slice(0, 16), text=slice(16, 20)) is sdpa


@torch.no_grad()
def test_rows_with_different_head_sets(model_kind):
    """One call carries several perturbed rows with different head sets; each equals its own single run."""
    transformer = make_transformer(model_kind)
    kwargs = make_inputs(model_kind, batch=2)
    sets = [resolve(transformer, spec) for spec in ("0.1", "2.0, 3", "1.1")]
    _, together = perturbed_forward(transformer, kwargs, [0, 1, 1], sets, Perturbation(0.8))
    for i, (src, hs) in enumerate(zip([0, 1, 1], sets)):
        _, alone = perturbed_forward(transformer, kwargs, [src], [hs], Perturbation(0.8))
        torch.testing.assert_close(together[i : i + 1], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("sequential", [False, True])
@torch.no_grad()
def test_prefix_sharing_equals_unshared(model_kind, sequential):
    transformer = make_transformer(model_kind)
    kwargs = make_inputs(model_kind, batch=2)
    heads = [resolve(transformer, "2.1, 3")]
    results = [
        perturbed_forward(transformer, kwargs, [1, 0], heads, share_prefix=share, sequential=sequential)
        for share in (False, True)
    ]
    reference = transformer(**kwargs)[0]
    for clean, _ in results:
        torch.testing.assert_close(clean[0], reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=ATOL, rtol=0)
    batch_args = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "guidance")
    swapped = {k: v[[1, 0]] if k in batch_args else v for k, v in kwargs.items()}
    expected = reference_forward(transformer, swapped, heads, Perturbation())[0]
    torch.testing.assert_close(results[1][1], expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_model_unchanged_after_calls_and_errors(model_kind):
    """Processors are never replaced; the registered hooks are inert outside a call, also after one that raised."""
    import copy

    transformer = make_transformer(model_kind)
    untouched = copy.deepcopy(transformer)
    processors = [attn.processor for attns in describe_transformer(transformer).attentions for attn in attns]
    kwargs = make_inputs(model_kind, batch=1)
    heads = [resolve(transformer, "3, 2.1")]
    with pytest.raises((IndexError, RuntimeError)):
        perturbed_forward(transformer, kwargs, [5], heads)  # row 5 of a batch of 1
    perturbed_forward(transformer, kwargs, [0], heads)
    after = [attn.processor for attns in describe_transformer(transformer).attentions for attn in attns]
    assert all(a is b for a, b in zip(processors, after))
    assert torch.equal(transformer(**kwargs)[0], untouched(**kwargs)[0])


def test_bad_values_raise_clear_errors():
    with pytest.raises(ValueError, match=r"identity_weight \(u\) must be a number in \[0, 1\], got 1.5"):
        Perturbation(1.5)
    with pytest.raises(ValueError, match="got -0.1"):
        Perturbation(-0.1)
    with pytest.raises(ValueError, match="Unknown identity scope 'text'; allowed: 'joint', 'image'"):
        Perturbation(1.0, scope="text")
    with pytest.raises(ValueError, match="Unknown perturbation target 'blur'"):
        Perturbation(1.0, target="blur")
    transformer = make_transformer("flux")
    with pytest.raises(ValueError, match=r"valid layers are 0-3"):
        resolve(transformer, "4.0")
    with pytest.raises(ValueError, match=r"valid heads are 0-3"):
        resolve(transformer, "1.4")
    with pytest.raises(ValueError, match="Unknown model family: Linear"):
        describe_transformer(torch.nn.Linear(2, 2))


def test_flux_layer_numbering():
    layout = describe_transformer(make_transformer("flux"))
    assert [layout.layer_kind(i) for i in range(4)] == ["double", "double", "single", "single"]
    assert layout.num_double_blocks == 2 and layout.text_first
