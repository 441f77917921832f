"""Head-level PAG beside the rest of diffusers: other guidance terms, user processors, caches, threads, offloading,
save/load, signatures. Each claim is checked against stock diffusers or an explicit formula."""

from __future__ import annotations

import inspect
import json
import threading

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FasterCacheConfig,
    FirstBlockCacheConfig,
    FluxPipeline,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    StableDiffusion3Pipeline,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)
from diffusers.models.attention_processor import JointAttnProcessor2_0

from headpag import FluxHeadPAGPipeline, HeadSet, StableDiffusion3HeadPAGPipeline, head_pag
from headpag.guidance import Perturbation
from headpag.models.tiny import tiny_flux_components, tiny_sd3_components
from headpag.runtime import describe_transformer
from headpag.testing.processors import reference_forward


COMMON = dict(num_inference_steps=3, height=32, width=32, output_type="latent", max_sequence_length=32)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd3():
    return StableDiffusion3Pipeline(**tiny_sd3_components())


@pytest.fixture(scope="module")
def flux():
    return FluxPipeline(**tiny_flux_components())


def resolved(pipe, spec):
    layout = describe_transformer(pipe.transformer)
    return HeadSet.parse(spec).resolve(layout.num_layers, layout.num_heads)


class StepSpy:
    """Records what the scheduler's own `step` receives (after head_pag added its term)."""

    def __init__(self, monkeypatch, scheduler):
        self.calls = []
        original = type(scheduler).step

        def step(sched, model_output, timestep, sample, *args, **kwargs):
            self.calls.append((model_output.clone(), timestep, sample.clone()))
            return original(sched, model_output, timestep, sample, *args, **kwargs)

        monkeypatch.setattr(type(scheduler), "step", step)


@torch.no_grad()
def test_skip_layer_guidance_keeps_its_own_term(sd3, monkeypatch):
    """SD3 SLG + PAG: v = v_u + g (v_c - v_u) + s (v_c - v_p) + slg (v_c - v_skip), each from the stock model."""
    spy = StepSpy(monkeypatch, sd3.scheduler)
    g, s, slg, u = 4.0, 2.0, 2.8, 0.7
    with head_pag(sd3, pag_heads="0.1, 2", pag_scale=s, pag_identity_weight=u):
        sd3(
            "a cat",
            negative_prompt="blur",
            **{**COMMON, "num_inference_steps": 2},
            guidance_scale=g,
            skip_guidance_layers=[1],
            skip_layer_guidance_scale=slg,
            skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0,
            generator=gen(),
        )
    v, t, latents = spy.calls[1]  # SLG runs from step 1 (diffusers: i > start * steps)
    pe, npe, pp, npp = sd3.encode_prompt("a cat", "a cat", "a cat", negative_prompt="blur", max_sequence_length=32)

    def call(e, p, **extra):
        kw = dict(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=e, pooled_projections=p)
        return dict(kw, return_dict=False, **extra)

    v_u = sd3.transformer(**call(npe, npp))[0]
    v_c = sd3.transformer(**call(pe, pp))[0]
    v_skip = sd3.transformer(**call(pe, pp, skip_layers=[1]))[0]
    v_p = reference_forward(sd3.transformer, call(pe, pp), [resolved(sd3, "0.1, 2")], Perturbation(u))[0]
    expected = v_u + g * (v_c - v_u) + s * (v_c - v_p) + slg * (v_c - v_skip)
    torch.testing.assert_close(v, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(v, v_u + g * (v_c - v_u) + slg * (v_c - v_skip), atol=1e-3)  # PAG did act


class CountingProcessor(JointAttnProcessor2_0):
    """A user's processor: the stock one, counting the rows it sees."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.rows.append(hidden_states.shape[0])
        return super().__call__(attn, hidden_states, *args, **kwargs)


@torch.no_grad()
def test_user_processor_keeps_running_and_u_zero_is_no_pag(sd3):
    attn = sd3.transformer.transformer_blocks[1].attn
    stock = attn.processor
    mine = CountingProcessor()
    attn.set_processor(mine)
    try:
        plain = sd3("a cat", **COMMON, guidance_scale=4.0, generator=gen()).images
        mine.rows.clear()
        with head_pag(sd3, pag_heads="1", pag_identity_weight=0.0):
            u0 = sd3("a cat", **COMMON, guidance_scale=4.0, generator=gen()).images
        assert mine.rows == [3, 3, 3]  # [uncond, cond, perturbed] every step, through the user's processor
        # u=0 is no perturbation; the batch of 3 rows instead of 2 may change float32 rounding (CPU kernels pick
        # their blocking by batch size): within 1e-5, as the other batched-vs-unbatched equalities.
        torch.testing.assert_close(u0, plain, atol=1e-5, rtol=0)
        with head_pag(sd3, pag_heads="1", pag_identity_weight=1.0):
            u1 = sd3("a cat", **COMMON, guidance_scale=4.0, generator=gen()).images
        assert not torch.allclose(u1, plain, atol=1e-3)
        assert attn.processor is mine
    finally:
        attn.set_processor(stock)


def no_skip_caches(pipe):
    """Every cache diffusers ships, in its setting that skips nothing (so its result must equal the uncached one)."""
    return {
        "FirstBlockCache": FirstBlockCacheConfig(threshold=0.0),
        "MagCache": MagCacheConfig(threshold=0.0, max_skip_steps=0, num_inference_steps=3, mag_ratios=torch.ones(3)),
        "SeaCache": SeaCacheConfig(threshold=0.0, max_consecutive_cached=0),
        "TaylorSeerCache": TaylorSeerCacheConfig(cache_interval=1, disable_cache_before_step=0),
        "FasterCache": FasterCacheConfig(
            spatial_attention_block_skip_range=1,
            unconditional_batch_skip_range=1,
            attention_weight_callback=lambda _: 0.5,
            current_timestep_callback=lambda: pipe.current_timestep,
            is_guidance_distilled=True,
        ),
        "PyramidAttentionBroadcast": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=1, current_timestep_callback=lambda: pipe.current_timestep
        ),
        "TextKVCache": TextKVCacheConfig(),
    }


CACHE_NAMES = list(no_skip_caches(None))


@pytest.mark.parametrize("name", CACHE_NAMES)
@pytest.mark.parametrize("sequential", [False, True])
@torch.no_grad()
def test_every_cache_without_skips_equals_uncached(name, sequential):
    """FLUX with true CFG and 2 images per prompt: with a cache that skips nothing, PAG equals uncached PAG."""
    pipe = FluxPipeline(**tiny_flux_components())
    kwargs = dict(COMMON, negative_prompt="blur", true_cfg_scale=2.0, num_images_per_prompt=2)
    with head_pag(pipe, pag_heads="1, 2.0", pag_sequential=sequential):
        expected = pipe("a cat", **kwargs, generator=gen()).images
    pipe.transformer.enable_cache(no_skip_caches(pipe)[name])
    with head_pag(pipe, pag_heads="1, 2.0", pag_sequential=sequential):
        got = pipe("a cat", **kwargs, generator=gen()).images
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


@torch.no_grad()
def test_pag_keeps_acting_on_cached_steps():
    """A first-block cache that skips every step after the first: the perturbed rows are cached like the others, so
    PAG still changes the result, and the sequential perturbed call keeps a cache state of its own."""
    results = {}
    for label, pag in {"plain": None, "batched": {}, "sequential": {"pag_sequential": True}}.items():
        pipe = FluxPipeline(**tiny_flux_components())
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
        if pag is None:
            results[label] = pipe("a cat", **COMMON, generator=gen()).images
            continue
        with head_pag(pipe, pag_heads="1, 2.0", **pag):
            results[label] = pipe("a cat", **COMMON, generator=gen()).images
    assert not torch.allclose(results["batched"], results["plain"], atol=1e-4)
    torch.testing.assert_close(results["sequential"], results["batched"], atol=2e-5, rtol=0)


def test_cache_combinations_that_cannot_be_exact_are_refused():
    pipe = FluxPipeline(**tiny_flux_components())
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    with pytest.raises(ValueError, match=r"caching hooks \(fbc_leader_block_hook.*pag_sequential=True"):
        with head_pag(pipe, pag_interval=(0.0, 0.5)):
            pytest.fail("the block must not run")
    with head_pag(pipe, pag_interval=(0.0, 0.5), pag_sequential=True):
        pipe("a cat", **COMMON, generator=gen())
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(
        FasterCacheConfig(current_timestep_callback=lambda: pipe.current_timestep, is_guidance_distilled=False)
    )
    with pytest.raises(ValueError, match="FasterCache on a model that is not guidance-distilled"):
        with head_pag(pipe):
            pytest.fail("the block must not run")


@pytest.mark.parametrize("cache", ["taylorseer", "mag"])
@torch.no_grad()
def test_sd3_cache_through_apply_function(cache):
    """SD3 has no `enable_cache`: diffusers' `apply_*` functions, inside a cache context the caller sets (stock SD3
    cannot run a first-block cache at all: its last block returns no text stream)."""
    from diffusers.hooks import apply_mag_cache, apply_taylorseer_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components())
    with head_pag(pipe, pag_heads="1, 2.0"):
        expected = pipe("a cat", **COMMON, guidance_scale=4.0, num_images_per_prompt=2, generator=gen()).images
    if cache == "taylorseer":
        apply_taylorseer_cache(pipe.transformer, TaylorSeerCacheConfig(cache_interval=1, disable_cache_before_step=0))
    else:
        config = MagCacheConfig(threshold=0.0, max_skip_steps=0, num_inference_steps=3, mag_ratios=torch.ones(3))
        apply_mag_cache(pipe.transformer, config)
    _set_cache_context(pipe.transformer, CacheContext("cond"))
    with head_pag(pipe, pag_heads="1, 2.0"):
        got = pipe("a cat", **COMMON, guidance_scale=4.0, num_images_per_prompt=2, generator=gen()).images
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


@torch.no_grad()
def test_other_threads_are_unaffected(sd3):
    """A stock call and a PAG call with other heads, in other threads, during a PAG call: each gets its own result."""
    other = StableDiffusion3Pipeline(
        **{**sd3.components, "scheduler": type(sd3.scheduler).from_config(sd3.scheduler.config)}
    )
    third = StableDiffusion3Pipeline(
        **{**sd3.components, "scheduler": type(sd3.scheduler).from_config(sd3.scheduler.config)}
    )
    stock_alone = other("a dog", **COMMON, generator=gen(1)).images
    with head_pag(third, pag_heads="3.1"):
        pag_alone = third("a cow", **COMMON, generator=gen(2)).images
    with head_pag(sd3, pag_heads="1"):
        main_alone = sd3("a cat", **COMMON, generator=gen()).images

    results = {}

    def stock_call():
        results["stock"] = other("a dog", **COMMON, generator=gen(1)).images

    def pag_call():
        with head_pag(third, pag_heads="3.1"):
            results["pag"] = third("a cow", **COMMON, generator=gen(2)).images

    def pause(pipe, i, t, kwargs):  # in the middle of the main PAG call, the others run start to finish
        if i == 0:
            for target in (stock_call, pag_call):
                thread = threading.Thread(target=target)
                thread.start()
                thread.join()
        return kwargs

    with head_pag(sd3, pag_heads="1"):
        main = sd3("a cat", **COMMON, generator=gen(), callback_on_step_end=pause).images
    assert torch.equal(results["stock"], stock_alone)
    torch.testing.assert_close(results["pag"], pag_alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(main, main_alone, atol=1e-6, rtol=0)


@torch.no_grad()
def test_group_offloading_keeps_working():
    pipe = StableDiffusion3Pipeline(**tiny_sd3_components())
    with head_pag(pipe, pag_heads="1.0, 2"):
        expected = pipe("a cat", **COMMON, generator=gen()).images
    pipe.transformer.enable_group_offload(
        onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    with head_pag(pipe, pag_heads="1.0, 2"):
        got = pipe("a cat", **COMMON, generator=gen()).images
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("first", ["offload", "pag"])
@torch.no_grad()
def test_model_cpu_offload_keeps_working(first):
    """accelerate's offload hooks and ours stack in either order (on CPU, where diffusers allows device="cpu")."""
    reference = StableDiffusion3Pipeline(**tiny_sd3_components())
    with head_pag(reference, pag_heads="1.0, 2"):
        expected = reference("a cat", **COMMON, guidance_scale=4.0, generator=gen()).images
    pipe = StableDiffusion3Pipeline(**tiny_sd3_components())
    if first == "pag":
        with head_pag(pipe, pag_heads="1.0, 2"):
            pipe("a cat", **COMMON, generator=gen())
    pipe.enable_model_cpu_offload(device="cpu")
    with head_pag(pipe, pag_heads="1.0, 2"):
        got = pipe("a cat", **COMMON, guidance_scale=4.0, generator=gen()).images
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_signature_and_docstring_are_the_parents_plus_pag():
    for ours, parent in (
        (StableDiffusion3HeadPAGPipeline, StableDiffusion3Pipeline),
        (FluxHeadPAGPipeline, FluxPipeline),
    ):
        params = inspect.signature(ours.__call__).parameters
        parent_params = inspect.signature(parent.__call__).parameters
        assert list(params)[: len(parent_params)] == list(parent_params)
        assert [n for n in params if n.startswith("pag_")] == [
            "pag_heads", "pag_scale", "pag_identity_weight", "pag_identity_scope", "pag_target", "pag_interval",
            "pag_adaptive_scale", "pag_sequential", "pag_share_prefix", "pag_reuse",
        ]  # fmt: skip
        assert (
            ours.__call__.__doc__.startswith(parent.__call__.__doc__)
            and "pag_identity_weight" in ours.__call__.__doc__
        )


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    pipe = StableDiffusion3HeadPAGPipeline(**tiny_sd3_components(), pag_heads="3.1, 2", pag_sequential=True)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    stock = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(stock) is StableDiffusion3Pipeline
    ours = StableDiffusion3HeadPAGPipeline.from_pretrained(tmp_path)
    assert ours.pag_heads == HeadSet.parse("3.1, 2") and ours._pag_sequential
    assert StableDiffusion3HeadPAGPipeline.from_pretrained(tmp_path, pag_heads="1").pag_heads == HeadSet([1])
    again = StableDiffusion3HeadPAGPipeline.from_pipe(ours)
    assert again.pag_heads == HeadSet.parse("3.1, 2") and again._pag_sequential
    a = ours("a cat", **COMMON, generator=gen()).images
    with head_pag(stock, pag_heads="3.1, 2"):
        b = stock("a cat", **COMMON, generator=gen()).images
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)  # sequential vs batched: batch-size effects only


def test_head_pag_validates_before_work(sd3):
    with pytest.raises(ValueError, match=r"identity_weight \(u\) must be a number in \[0, 1\], got nan"):
        with head_pag(sd3, pag_identity_weight=float("nan")):
            pass
    with pytest.raises(ValueError, match="pag_scale must be a finite number >= 0, got inf"):
        with head_pag(sd3, pag_scale=float("inf")):
            pass
    with pytest.raises(ValueError, match="valid layers are 0-3"):
        with head_pag(sd3, pag_heads="7.1"):
            pass
    with pytest.raises(ValueError, match="needs a pipeline with a `transformer`"):
        with head_pag(object()):
            pass
    assert "step" not in vars(sd3.scheduler)


@torch.no_grad()
def test_torch_compile_adds_no_graph_after_the_first_call():
    """A compiled transformer: PAG equals eager PAG, and later calls and `with` blocks add no compiled graph."""
    from torch._dynamo.utils import counters

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components())
    kwargs = dict(COMMON, guidance_scale=4.0)
    with head_pag(pipe, pag_heads="1, 2.0"):
        eager = pipe("a cat", **kwargs, generator=gen()).images
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    graphs = []
    for _ in range(3):
        with head_pag(pipe, pag_heads="1, 2.0"):
            compiled = pipe("a cat", **kwargs, generator=gen()).images
        graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    assert graphs[0] > 0 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs


def add_tiny_ip_adapter(transformer, image_embed_dim=16, tokens=4):
    """A random IP-Adapter, set up the way diffusers' `FluxTransformer2DLoadersMixin` does after loading weights."""
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    torch.manual_seed(7)
    dim = transformer.config.joint_attention_dim
    projection = ImageProjection(
        cross_attention_dim=dim, image_embed_dim=image_embed_dim, num_image_text_embeds=tokens
    )
    transformer.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    transformer.config.encoder_hid_dim_type = "ip_image_proj"
    processors = {}
    for name, processor in transformer.attn_processors.items():
        if name.startswith("single_transformer_blocks"):
            processors[name] = processor
        else:
            ip = FluxIPAdapterAttnProcessor(
                hidden_size=transformer.inner_dim, cross_attention_dim=dim, num_tokens=(tokens,), scale=1.0
            )
            for linear in (*ip.to_k_ip, *ip.to_v_ip):
                torch.nn.init.normal_(linear.weight, std=0.3)
            processors[name] = ip
    transformer.set_attn_processor(processors)


@torch.no_grad()
def test_flux_ip_adapter_with_pag():
    pipe = FluxPipeline(**tiny_flux_components())
    add_tiny_ip_adapter(pipe.transformer)
    embeds = [torch.randn(1, 1, 16, generator=gen(1))]
    kwargs = dict(
        COMMON,
        num_images_per_prompt=2,
        ip_adapter_image_embeds=embeds,
        negative_ip_adapter_image_embeds=[torch.zeros(1, 1, 16)],
        negative_prompt="blur",
        true_cfg_scale=2.0,
    )
    plain = pipe("a cat", **kwargs, generator=gen()).images
    without_ip = pipe(
        "a cat", **{**kwargs, "ip_adapter_image_embeds": [torch.zeros(1, 1, 16)]}, generator=gen()
    ).images
    assert not torch.allclose(plain, without_ip, atol=1e-4)  # the adapter does act
    with head_pag(pipe, pag_heads="0, 3.1", pag_identity_weight=0.0):
        u0 = pipe("a cat", **kwargs, generator=gen()).images
    torch.testing.assert_close(u0, plain, atol=2e-6, rtol=0)
    results = {}
    for label, options in {"batched": {}, "sequential": {"pag_sequential": True, "pag_share_prefix": False}}.items():
        with head_pag(pipe, pag_heads="0, 3.1", **options):
            results[label] = pipe("a cat", **kwargs, generator=gen()).images
    assert not torch.allclose(results["batched"], plain, atol=1e-4)
    torch.testing.assert_close(results["batched"], results["sequential"], atol=2e-5, rtol=0)


@torch.no_grad()
def test_modular_sd3_guider_equals_the_pipeline_class(tmp_path):
    from diffusers.modular_pipelines.stable_diffusion_3 import StableDiffusion3AutoBlocks

    from headpag import HeadPerturbedAttentionGuidance

    components = tiny_sd3_components()
    guider = HeadPerturbedAttentionGuidance(
        guidance_scale=4.0, pag_scale=2.0, pag_heads="1, 2.0", pag_identity_weight=0.7
    )
    guider.save_config(tmp_path)
    reloaded = HeadPerturbedAttentionGuidance.from_config(HeadPerturbedAttentionGuidance.load_config(tmp_path))
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(reloaded.config) == public(guider.config)
    modular = StableDiffusion3AutoBlocks().init_pipeline()
    modular.update_components(**components, guider=reloaded)
    kwargs = dict(num_inference_steps=3, height=32, width=32, max_sequence_length=32)
    got = modular(prompt="a cat", negative_prompt="", **kwargs, generator=gen(), output="latents")
    ours = StableDiffusion3HeadPAGPipeline(**components)
    expected = ours(
        "a cat",
        **kwargs,
        output_type="latent",
        guidance_scale=4.0,
        pag_scale=2.0,
        pag_heads="1, 2.0",
        pag_identity_weight=0.7,
        generator=gen(),
    ).images
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    plain = ours("a cat", **kwargs, output_type="latent", guidance_scale=4.0, pag_scale=0, generator=gen()).images
    assert not torch.allclose(got, plain, atol=1e-3)
    with pytest.raises(ValueError, match=r"identity_weight \(u\) must be a number in \[0, 1\], got 3"):
        HeadPerturbedAttentionGuidance(pag_identity_weight=3)


@torch.no_grad()
def test_pag_survives_removing_a_cache_registered_before_it():
    """`disable_cache()` after a head-PAG call under a cache: PAG must still act (diffusers' `remove_hook` drops the
    next `new_forward` hook from the chain; the runtime puts it back)."""
    pipe = FluxPipeline(**tiny_flux_components())
    with head_pag(pipe, pag_heads="1, 2.0"):
        expected = pipe("a cat", **COMMON, generator=gen()).images
    pipe = FluxPipeline(**tiny_flux_components())
    pipe.transformer.enable_cache(no_skip_caches(pipe)["FasterCache"])  # hooks on the transformer and attentions
    with head_pag(pipe, pag_heads="1, 2.0"):
        pipe("a cat", **COMMON, generator=gen())
    pipe.transformer.disable_cache()
    with head_pag(pipe, pag_heads="1, 2.0"):
        got = pipe("a cat", **COMMON, generator=gen()).images
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
