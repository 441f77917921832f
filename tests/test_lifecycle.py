"""
The call lifecycle: every PAG call applies PAG exactly or raises. Offloading, `remove_all_hooks`, forward wrappers and
patches, scheduler swaps, executors, shared transformers, precedence of arguments, hand-written loops and row-by-row
processors, each with at least two calls and against a reference written outside headpag (`pag_reference`) or an
exact identity (a stock call on a fresh pipeline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import functools
import logging

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from pag_reference import positive_embeds, reference_pag

from headpag import HeadSet, StableDiffusion3HeadPAGPipeline, head_pag
from headpag.models.tiny import tiny_sd3_components


HEADS, S, U = "1.0, 2", 2.0, 0.7
COMMON = dict(num_inference_steps=3, height=32, width=32, output_type="latent", max_sequence_length=32)
CFG = dict(COMMON, guidance_scale=4.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stock_pipe(cls=StableDiffusion3Pipeline):
    pipe = cls(**tiny_sd3_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def expected():
    """The reference PAG latents (`v_u + g (v_c - v_u) + s (v_c - v_p)`, combined by hand) and the stock ones."""
    pipe = stock_pipe()
    with reference_pag(pipe, HEADS, S, U, positive_embeds(pipe, "a cat", max_sequence_length=32)):
        pag = pipe("a cat", **CFG, generator=gen()).images
    stock = pipe("a cat", **CFG, generator=gen()).images
    assert not torch.allclose(pag, stock, atol=1e-4)
    return {"pag": pag, "stock": stock}


def pag_call(pipe, kind: str, sequential: bool):
    options = dict(pag_heads=HEADS, pag_scale=S, pag_identity_weight=U, pag_sequential=sequential)
    if kind == "class":
        return pipe("a cat", **CFG, **options, generator=gen()).images
    return pipe("a cat", **CFG, generator=gen()).images


# ---------------------------------------------------------------------------------------------------------------
# Offloading and forward patches


@pytest.mark.parametrize("kind", ["class", "head_pag"])
@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("offload", ["before", "after-first"])
@torch.no_grad()
def test_model_cpu_offload_three_calls(expected, kind, sequential, blocks, offload):
    """`enable_model_cpu_offload` (diffusers re-runs `remove_all_hooks()` + offload after every call): every PAG call
    equals the reference, with a stock call and `remove_all_hooks()` in between; the stock call equals stock."""
    pipe = stock_pipe(StableDiffusion3HeadPAGPipeline if kind == "class" else StableDiffusion3Pipeline)
    if offload == "before":
        pipe.enable_model_cpu_offload(device="cpu")
    block_options = dict(pag_heads=HEADS, pag_scale=S, pag_identity_weight=U, pag_sequential=sequential)
    outer = head_pag(pipe, **block_options) if kind == "head_pag" and blocks == "one" else None
    results, stock = [], []
    with outer or contextlib_null():
        for i in range(3):
            if kind == "head_pag" and blocks == "several":
                with head_pag(pipe, **block_options):
                    results.append(pag_call(pipe, kind, sequential))
            else:
                results.append(pag_call(pipe, kind, sequential))
            if i == 0 and offload == "after-first":
                pipe.enable_model_cpu_offload(device="cpu")
            if i == 1:
                pipe.remove_all_hooks()
                pipe.enable_model_cpu_offload(device="cpu")
    if kind == "class":
        stock.append(pipe("a cat", **CFG, pag_scale=0, generator=gen()).images)
    else:
        stock.append(pipe("a cat", **CFG, generator=gen()).images)
    for result in results:
        torch.testing.assert_close(result, expected["pag"], atol=5e-5, rtol=0)
    assert torch.equal(stock[0], expected["stock"])


def contextlib_null():
    import contextlib

    return contextlib.nullcontext()


@torch.no_grad()
def test_forward_wrappers_del_forward_and_remove_all_hooks(expected):
    """A wrapper set and removed by another tool, `del transformer.forward`, `remove_all_hooks()`: PAG stays exact."""
    pipe = stock_pipe()
    transformer = pipe.transformer
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U):
        first = pipe("a cat", **CFG, generator=gen()).images
        original = transformer.forward
        seen = []

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            seen.append(kwargs["hidden_states"].shape[0])
            return original(*args, **kwargs)

        transformer.forward = wrapper
        wrapped = pipe("a cat", **CFG, generator=gen()).images
        transformer.forward = original
        unwrapped = pipe("a cat", **CFG, generator=gen()).images
        del transformer.forward
        deleted = pipe("a cat", **CFG, generator=gen()).images
        pipe.remove_all_hooks()
        removed = pipe("a cat", **CFG, generator=gen()).images
    assert seen == [3, 3, 3]  # the wrapper ran, on [uncond, cond, perturbed]
    for result in (first, wrapped, unwrapped, deleted, removed):
        torch.testing.assert_close(result, expected["pag"], atol=5e-5, rtol=0)
    assert torch.equal(pipe("a cat", **CFG, generator=gen()).images, expected["stock"])


@torch.no_grad()
def test_class_forward_patch_after_the_first_pag_call(expected, monkeypatch):
    """A class-level forward patch made after a PAG call runs on that instance, for PAG and stock calls alike."""
    pipe = stock_pipe()
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U):
        pipe("a cat", **CFG, generator=gen())
    calls = []
    original = SD3Transformer2DModel.forward

    def patched(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SD3Transformer2DModel, "forward", patched)
    stock = pipe("a cat", **CFG, generator=gen()).images
    assert len(calls) == 3 and torch.equal(stock, expected["stock"])
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U):
        pag = pipe("a cat", **CFG, generator=gen()).images
    assert len(calls) == 6
    torch.testing.assert_close(pag, expected["pag"], atol=5e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Breaking the attachment on purpose: the call raises at the first step without PAG, never a stock image.


class DirectCall(SD3Transformer2DModel):
    """A transformer whose `__call__` skips module hooks (calls `forward` directly), as some tools' wrappers do."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


@torch.no_grad()
def test_a_call_that_skips_the_hooks_raises_at_the_first_step():
    pipe = stock_pipe()
    pipe.transformer.__class__ = DirectCall
    with pytest.raises(RuntimeError, match=r"not applied at step 0 .*no transformer call reached.*nn.Module.__call__"):
        with head_pag(pipe, pag_heads=HEADS):
            pipe("a cat", **CFG, generator=gen())


@torch.no_grad()
def test_hooks_removed_during_a_call_raise_at_that_step():
    pipe = stock_pipe()

    def clear(p, i, t, kwargs):
        if i == 0:
            p.transformer._forward_pre_hooks.clear()
            p.transformer._forward_hooks.clear()
        return kwargs

    with pytest.raises(RuntimeError, match=r"not applied at step 1 .*forward hooks were removed"):
        with head_pag(pipe, pag_heads=HEADS):
            pipe("a cat", **CFG, generator=gen(), callback_on_step_end=clear)
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U):  # the next call re-attaches
        again = pipe("a cat", **CFG, generator=gen()).images
    stock = stock_pipe()
    with reference_pag(stock, HEADS, S, U, positive_embeds(stock, "a cat", max_sequence_length=32)):
        torch.testing.assert_close(again, stock("a cat", **CFG, generator=gen()).images, atol=5e-5, rtol=0)


@torch.no_grad()
def test_scheduler_swapped_during_the_loop_raises():
    pipe = stock_pipe()

    def swap(p, i, t, kwargs):
        if i == 0:
            p.scheduler = copy.deepcopy(p.scheduler)
        return kwargs

    with pytest.raises(RuntimeError, match=r"never added.*pipe.scheduler was replaced during the loop"):
        with head_pag(pipe, pag_heads=HEADS):
            pipe("a cat", **dict(CFG, num_inference_steps=4), generator=gen(), callback_on_step_end=swap)


@torch.no_grad()
def test_scheduler_swapped_between_calls_still_gets_the_term(expected):
    pipe = stock_pipe()
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U):
        first = pipe("a cat", **CFG, generator=gen()).images
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        second = pipe("a cat", **CFG, generator=gen()).images
    for result in (first, second):
        torch.testing.assert_close(result, expected["pag"], atol=5e-5, rtol=0)
    assert "step" not in vars(pipe.scheduler) and "progress_bar" not in vars(pipe)


# ---------------------------------------------------------------------------------------------------------------
# Contexts, threads, nesting, precedence


@torch.no_grad()
def test_executor_calls_warn_once_per_block_and_stay_stock(expected, caplog):
    pipe = stock_pipe()
    caplog.set_level(logging.WARNING, logger="headpag")
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U):
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            plain = [executor.submit(pipe, "a cat", **CFG, generator=gen()).result().images for _ in range(2)]
            ctx = contextvars.copy_context()
            copied = executor.submit(ctx.run, pipe, "a cat", **CFG, generator=gen()).result().images

        async def main():
            return (await asyncio.to_thread(pipe, "a cat", **CFG, generator=gen())).images

        threaded = asyncio.run(main())
    warnings = [r for r in caplog.records if "without its open `with head_pag" in r.getMessage()]
    assert len(warnings) == 1 and "copy_context" in warnings[0].getMessage()
    for result in plain:
        assert torch.equal(result, expected["stock"])
    for result in (copied, threaded):
        torch.testing.assert_close(result, expected["pag"], atol=5e-5, rtol=0)


@torch.no_grad()
def test_stock_pipelines_sharing_a_transformer_each_get_their_own_block(expected):
    t2i = stock_pipe()
    i2i = StableDiffusion3Img2ImgPipeline.from_pipe(t2i)
    with head_pag(t2i, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U), head_pag(i2i, pag_heads="3.1"):
        got = t2i("a cat", **CFG, generator=gen()).images
        image = torch.zeros(1, 3, 32, 32)
        i2i_pag = i2i("a cat", image=image, strength=0.9, **CFG, generator=gen()).images
    torch.testing.assert_close(got, expected["pag"], atol=5e-5, rtol=0)
    with head_pag(i2i, pag_heads="3.1"):
        alone = i2i("a cat", image=image, strength=0.9, **CFG, generator=gen()).images
    torch.testing.assert_close(i2i_pag, alone, atol=1e-6, rtol=0)


@torch.no_grad()
def test_classes_sharing_a_transformer_each_get_their_own_heads(expected):
    a = StableDiffusion3HeadPAGPipeline(**tiny_sd3_components(), pag_heads=HEADS)
    b = StableDiffusion3HeadPAGPipeline.from_pipe(a, pag_heads="3.1")
    a.set_progress_bar_config(disable=True)
    got = a("a cat", **CFG, pag_scale=S, pag_identity_weight=U, generator=gen()).images
    torch.testing.assert_close(got, expected["pag"], atol=5e-5, rtol=0)
    assert b.pag_heads == HeadSet.parse("3.1") and a.pag_heads == HeadSet.parse(HEADS)
    with head_pag(a, pag_heads="3.1"):
        other = a("a cat", **CFG, generator=gen()).images
    torch.testing.assert_close(b("a cat", **CFG, generator=gen()).images, other, atol=1e-6, rtol=0)


@torch.no_grad()
def test_precedence_call_beats_block_beats_class_defaults(expected):
    pipe = StableDiffusion3HeadPAGPipeline(**tiny_sd3_components(), pag_heads="3.1")
    pipe.set_progress_bar_config(disable=True)
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U):
        from_block = pipe("a cat", **CFG, generator=gen()).images  # the block's heads, not the class default
        zero = pipe("a cat", **CFG, pag_scale=0, generator=gen()).images  # always exactly the parent
        overridden = pipe("a cat", **CFG, pag_heads="3.1", generator=gen()).images  # the call's heads
    torch.testing.assert_close(from_block, expected["pag"], atol=5e-5, rtol=0)
    assert torch.equal(zero, expected["stock"])
    default = pipe("a cat", **CFG, pag_scale=S, pag_identity_weight=U, generator=gen()).images
    torch.testing.assert_close(overridden, default, atol=1e-6, rtol=0)
    assert not torch.allclose(default, from_block, atol=1e-4)


def test_a_list_of_spec_strings_is_refused():
    pipe = stock_pipe()
    with pytest.raises(ValueError, match=r"list of spec strings, which is ambiguous.*HeadSet.parse"):
        with head_pag(pipe, pag_heads=["1.0", "2", "0.1, 3.2"]):
            pytest.fail("the block must not run")
    assert HeadSet(["1.0", "2"]) == HeadSet.parse("1.0, 2")  # HeadSet keeps its meaning: one set


@torch.no_grad()
def test_a_hand_written_loop_inside_a_block_raises():
    pipe = stock_pipe()
    latents = torch.randn(1, 4, 4, 4, generator=gen())
    embeds, _, pooled, _ = pipe.encode_prompt("a cat", "a cat", "a cat", max_sequence_length=32)
    call = dict(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=embeds)
    with head_pag(pipe, pag_heads=HEADS):
        with pytest.raises(RuntimeError, match="not part of a pipeline call.*perturbed_forward"):
            pipe.transformer(**call, pooled_projections=pooled)
    out = pipe.transformer(**call, pooled_projections=pooled)[0]  # outside the block: stock
    assert torch.equal(out, stock_pipe().transformer(**call, pooled_projections=pooled)[0])


class RowByRow(JointAttnProcessor2_0):
    """A processor that computes attention one batch row at a time."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        outs = [
            super(RowByRow, self).__call__(attn, hidden_states[i : i + 1], encoder_hidden_states[i : i + 1])
            for i in range(hidden_states.shape[0])
        ]
        return tuple(torch.cat(parts) for parts in zip(*outs))


@torch.no_grad()
def test_row_by_row_processors_are_refused_with_their_name():
    pipe = stock_pipe()
    pipe.transformer.transformer_blocks[1].attn.set_processor(RowByRow())
    stock = pipe("a cat", **CFG, generator=gen()).images
    with pytest.raises(RuntimeError, match=r"processor RowByRow computed attention over 1 row\(s\) of a batch of 3"):
        with head_pag(pipe, pag_heads="1"):
            pipe("a cat", **CFG, generator=gen())
    assert torch.equal(pipe("a cat", **CFG, generator=gen()).images, stock)


@torch.no_grad()
def test_a_class_called_from_an_executor_warns_that_the_block_does_not_apply(caplog):
    pipe = StableDiffusion3HeadPAGPipeline(**tiny_sd3_components(), pag_heads="3.1")
    pipe.set_progress_bar_config(disable=True)
    caplog.set_level(logging.WARNING, logger="headpag")
    defaults = pipe("a cat", **CFG, generator=gen()).images
    with head_pag(pipe, pag_heads=HEADS):
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            got = executor.submit(pipe, "a cat", **CFG, generator=gen()).result().images
    warnings = [r.getMessage() for r in caplog.records if "without its open `with head_pag" in r.getMessage()]
    assert len(warnings) == 1 and "uses the model's defaults" in warnings[0]
    torch.testing.assert_close(got, defaults, atol=1e-6, rtol=0)


@torch.no_grad()
def test_interval_and_interrupt_count_only_the_steps_that_ran():
    """Steps outside `pag_interval` get no term, and steps the pipeline skips after `interrupt` are not owed one."""
    steps = dict(CFG, num_inference_steps=4)
    pipe = stock_pipe()
    with reference_pag(pipe, HEADS, S, U, positive_embeds(pipe, "a cat", max_sequence_length=32), steps=range(2, 4)):
        expected = pipe("a cat", **steps, generator=gen()).images
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U, pag_interval=(0.5, 1.0)):
        got = pipe("a cat", **steps, generator=gen()).images
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)

    def interrupt(p, i, t, kwargs):
        if i == 1:
            p._interrupt = True
        return kwargs

    with reference_pag(pipe, HEADS, S, U, positive_embeds(pipe, "a cat", max_sequence_length=32)):
        expected = pipe("a cat", **steps, generator=gen(), callback_on_step_end=interrupt).images
    with head_pag(pipe, pag_heads=HEADS, pag_scale=S, pag_identity_weight=U):
        got = pipe("a cat", **steps, generator=gen(), callback_on_step_end=interrupt).images
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)
