"""End-to-end tests of the head-PAG pipelines on tiny random SD3, SD3.5-like and FLUX models saved to disk."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3PAGPipeline, StableDiffusion3Pipeline
from PIL import Image

from headpag import (
    FluxHeadPAGImg2ImgPipeline,
    FluxHeadPAGPipeline,
    HeadSet,
    StableDiffusion3HeadPAGImg2ImgPipeline,
    StableDiffusion3HeadPAGPipeline,
    load_pipeline,
)
from headpag.guidance import Perturbation
from headpag.runtime import describe_transformer
from headpag.testing.combine import perturbation_guidance
from headpag.testing.processors import reference_forward


COMMON = dict(num_inference_steps=3, height=32, width=32, output_type="latent", max_sequence_length=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny pipelines saved to folders, as a user would have them on disk."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for name in ("tiny-sd3", "tiny-sd35", "tiny-flux"):
        pipe = load_pipeline(name)
        folders[name] = root / name
        pipe.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="module")
def sd3(saved):
    return load_pipeline(str(saved["tiny-sd3"]))


@pytest.fixture(scope="module")
def flux(saved):
    return load_pipeline(str(saved["tiny-flux"]))


def resolved(pipe, spec):
    layout = describe_transformer(pipe.transformer)
    return HeadSet.parse(spec).resolve(layout.num_layers, layout.num_heads)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class BatchSpy:
    """Records the batch size of every transformer forward (seen at its input embedding)."""

    def __init__(self, transformer):
        self.sizes = []
        embedder = transformer.pos_embed if hasattr(transformer, "patch_size") else transformer.x_embedder
        embedder = transformer.x_embedder if hasattr(transformer, "x_embedder") else embedder
        self.handle = embedder.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.sizes.append(args[0].shape[0])

    def close(self):
        self.handle.remove()


def test_load_from_folder_and_types(saved):
    assert isinstance(load_pipeline(str(saved["tiny-sd3"])), StableDiffusion3HeadPAGPipeline)
    assert isinstance(load_pipeline(str(saved["tiny-sd35"]), img2img=True), StableDiffusion3HeadPAGImg2ImgPipeline)
    assert isinstance(load_pipeline(str(saved["tiny-flux"])), FluxHeadPAGPipeline)
    pipe = FluxHeadPAGImg2ImgPipeline.from_pretrained(saved["tiny-flux"], pag_heads="1.0")
    assert pipe.pag_heads == HeadSet([(1, 0)])


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ValueError, match="Unknown model family.*StableDiffusionXLPipeline"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ValueError, match="Hugging Face Hub could not be reached.*local folder"):
        load_pipeline("nobody/no-such-model-xyz")


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_pag_scale_zero_is_the_parent_pipeline(sd3, guidance_scale):
    spy = BatchSpy(sd3.transformer)
    ours = sd3("a cat", **COMMON, guidance_scale=guidance_scale, pag_scale=0.0, generator=gen()).images
    spy.close()
    parent = StableDiffusion3Pipeline(**sd3.components)
    base = parent("a cat", **COMMON, guidance_scale=guidance_scale, generator=gen()).images
    assert torch.equal(ours, base)
    assert spy.sizes == [2 if guidance_scale > 1 else 1] * 3  # no perturbed rows


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_image_scope_layer_pag_equals_diffusers_sd3_pag_pipeline(sd3, guidance_scale):
    components = {k: v for k, v in sd3.components.items() if k not in ("image_encoder", "feature_extractor")}
    # Name layers exactly: diffusers' regex "blocks.1" would also match blocks 10-19.
    theirs = StableDiffusion3PAGPipeline(**components, pag_applied_layers=[r"transformer_blocks\.1\.attn$"])
    expected = theirs("a cat", **COMMON, guidance_scale=guidance_scale, pag_scale=2.5, generator=gen()).images
    ours = sd3(
        "a cat",
        **COMMON,
        guidance_scale=guidance_scale,
        pag_scale=2.5,
        pag_heads="1",
        pag_identity_scope="image",
        generator=gen(),
    ).images
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    plain = sd3("a cat", **COMMON, guidance_scale=guidance_scale, pag_scale=0, generator=gen()).images
    assert not torch.allclose(ours, plain, atol=1e-3)


def one_step_velocity(pipe, latents, **kwargs):
    """With one Euler step from sigma=1 to 0, the returned latents are `latents - v`."""
    out = pipe(latents=latents.clone(), num_inference_steps=1, output_type="latent", max_sequence_length=32, **kwargs)
    return latents - out.images


@torch.no_grad()
def test_sd3_guidance_formula(sd3):
    latents = torch.randn(1, 4, 16, 16, generator=gen(3))
    g, s = 4.0, 2.0
    v = one_step_velocity(
        sd3,
        latents,
        prompt="a cat",
        negative_prompt="blur",
        height=32,
        width=32,
        guidance_scale=g,
        pag_scale=s,
        pag_heads="0.1, 2",
        pag_identity_weight=0.6,
    )
    pe, npe, pp, npp = sd3.encode_prompt("a cat", "a cat", "a cat", negative_prompt="blur", max_sequence_length=32)
    t = sd3.scheduler.timesteps[:1]

    def call(e, p):
        return dict(
            hidden_states=latents, timestep=t, encoder_hidden_states=e, pooled_projections=p, return_dict=False
        )

    v_u = sd3.transformer(**call(npe, npp))[0]
    v_c = sd3.transformer(**call(pe, pp))[0]
    v_p = reference_forward(sd3.transformer, call(pe, pp), [resolved(sd3, "0.1, 2")], Perturbation(0.6))[0]
    torch.testing.assert_close(v, perturbation_guidance(v_u, v_c, v_p, g, s), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_flux_guidance_formula_and_call_layout(flux):
    latents = torch.randn(1, 64, 16, generator=gen(4))
    spy = BatchSpy(flux.transformer)
    v = one_step_velocity(
        flux,
        latents,
        prompt="a cat",
        negative_prompt="blur",
        height=32,
        width=32,
        guidance_scale=3.5,
        true_cfg_scale=2.0,
        pag_scale=1.5,
        pag_heads="2.1, 3",
        pag_identity_weight=1.0,
    )
    spy.close()
    assert spy.sizes == [2, 1]  # [cond, perturbed] in the conditional call, then the negative prompt alone
    pe, pp, ids = flux.encode_prompt("a cat", "a cat", max_sequence_length=32)
    npe, npp, nids = flux.encode_prompt("blur", "blur", max_sequence_length=32)
    img_ids = flux._prepare_latent_image_ids(1, 8, 8, latents.device, latents.dtype)
    t = flux.scheduler.timesteps[:1] / 1000

    def call(e, p, i):
        return dict(
            hidden_states=latents,
            timestep=t,
            guidance=torch.tensor([3.5]),
            encoder_hidden_states=e,
            pooled_projections=p,
            txt_ids=i,
            img_ids=img_ids,
            return_dict=False,
        )

    v_u = flux.transformer(**call(npe, npp, nids))[0]
    v_c = flux.transformer(**call(pe, pp, ids))[0]
    v_p = reference_forward(flux.transformer, call(pe, pp, ids), [resolved(flux, "2.1, 3")], Perturbation())[0]
    torch.testing.assert_close(v, perturbation_guidance(v_u, v_c, v_p, 2.0, 1.5), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd35", "tiny-flux"])
def test_sequential_and_prefix_sharing_equal_batched(saved, name):
    pipe = load_pipeline(str(saved[name]))
    extra = {"guidance_scale": 4.0} if name != "tiny-flux" else {"negative_prompt": "x", "true_cfg_scale": 2.0}
    runs = {}
    for label, opts in {
        "batched": {},
        "unshared": {"pag_share_prefix": False},
        "sequential": {"pag_sequential": True},
        "sequential-unshared": {"pag_sequential": True, "pag_share_prefix": False},
    }.items():
        runs[label] = pipe("a cat", **COMMON, **extra, pag_heads="2.1, 3", generator=gen(), **opts).images
    for label, images in runs.items():
        torch.testing.assert_close(images, runs["batched"], atol=1e-5, rtol=0, msg=label)
    pipe.set_pag_sequential(True)
    spy = BatchSpy(pipe.transformer)
    again = pipe("a cat", **COMMON, **extra, pag_heads="2.1, 3", generator=gen()).images
    spy.close()
    torch.testing.assert_close(again, runs["batched"], atol=1e-5, rtol=0)
    assert max(spy.sizes) <= 2


def test_interval_and_adaptive_scale_skip_the_perturbed_pass(sd3):
    spy = BatchSpy(sd3.transformer)
    sd3("a cat", **{**COMMON, "num_inference_steps": 4}, guidance_scale=5.0, pag_interval=(0.5, 1.0), generator=gen())
    assert spy.sizes == [2, 2, 3, 3]
    spy.sizes.clear()
    sd3("a cat", **COMMON, guidance_scale=5.0, pag_adaptive_scale=1.0, generator=gen())
    assert spy.sizes == [3, 2, 2]  # full scale at t=1000, then s - a (1000 - t) < 0: no perturbed pass
    timesteps = sd3.scheduler.timesteps.tolist()
    a = 2.0 / (1000 - (timesteps[1] + timesteps[2]) / 2)  # reaches 0 between the 2nd and 3rd step
    spy.sizes.clear()
    sd3("a cat", **COMMON, guidance_scale=1.0, pag_scale=2.0, pag_adaptive_scale=a, generator=gen())
    assert spy.sizes == [2, 2, 1]
    spy.close()


def test_batches_images_per_prompt_generators_callbacks(sd3):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, kwargs["latents"].shape[0]))
        return kwargs

    out = sd3(
        ["a cat", "a dog"],
        negative_prompt=["blur", "noise"],
        num_images_per_prompt=2,
        **COMMON,
        guidance_scale=5.0,
        generator=[gen(i) for i in range(4)],
        callback_on_step_end=callback,
        pag_heads="1.0-1",
    ).images
    assert out.shape == (4, 4, 16, 16) and seen == [(0, 4), (1, 4), (2, 4)]
    # Each image equals its own single generation with the same generator.
    single = sd3("a dog", negative_prompt="noise", **COMMON, guidance_scale=5.0, generator=gen(3), pag_heads="1.0-1")
    torch.testing.assert_close(out[3:], single.images, atol=1e-4, rtol=0)


def test_per_image_head_sets(sd3):
    sets = [HeadSet.parse("0.1"), HeadSet.parse("3")]
    both = sd3(["a cat", "a cat"], **COMMON, generator=[gen(), gen()], pag_heads=sets).images
    for i, hs in enumerate(sets):
        alone = sd3("a cat", **COMMON, generator=gen(), pag_heads=hs).images
        torch.testing.assert_close(both[i : i + 1], alone, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="2 head sets but the call generates 3 images"):
        sd3(["a", "b", "c"], **COMMON, pag_heads=sets)


def test_pil_output_img2img_and_sd35(saved):
    pipe = load_pipeline(str(saved["tiny-sd35"]), img2img=True)
    layout = describe_transformer(pipe.transformer)
    assert layout.attentions[0][1] is pipe.transformer.transformer_blocks[0].attn2
    image = Image.new("RGB", (32, 32), (120, 30, 200))
    out = pipe(
        "a cat",
        image=image,
        strength=0.6,
        num_inference_steps=4,
        max_sequence_length=32,
        pag_heads="0.1",
        generator=gen(),
    ).images
    assert isinstance(out[0], Image.Image)
    fpipe = load_pipeline(str(saved["tiny-flux"]), img2img=True)
    out = fpipe(
        "a cat",
        image=image,
        strength=0.6,
        num_inference_steps=4,
        height=32,
        width=32,
        max_sequence_length=32,
        pag_heads="2",
        generator=gen(),
    ).images
    assert isinstance(out[0], Image.Image)


def test_model_restored_after_call_and_error(sd3):
    """Processors are never swapped; after a call that raised, the scheduler and the hooks are inert again."""
    before = [m.processor for attns in describe_transformer(sd3.transformer).attentions for m in attns]
    stock = StableDiffusion3Pipeline(**sd3.components)
    expected = stock("a cat", **COMMON, generator=gen()).images

    def boom(*args):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        sd3("a cat", **COMMON, pag_heads="1, 2", callback_on_step_end=boom)
    after = [m.processor for attns in describe_transformer(sd3.transformer).attentions for m in attns]
    assert all(a is b for a, b in zip(before, after))
    assert "step" not in vars(sd3.scheduler)
    assert torch.equal(stock("a cat", **COMMON, generator=gen()).images, expected)


def test_bad_arguments_fail_before_any_work(sd3):
    spy = BatchSpy(sd3.transformer)
    with pytest.raises(ValueError, match=r"identity_weight \(u\) must be a number in \[0, 1\], got 2"):
        sd3("a cat", **COMMON, pag_identity_weight=2)
    with pytest.raises(ValueError, match="valid layers are 0-3"):
        sd3("a cat", **COMMON, pag_heads="9")
    with pytest.raises(ValueError, match="Unknown identity scope"):
        sd3("a cat", **COMMON, pag_identity_scope="text")
    with pytest.raises(ValueError, match="pag_scale must be a finite number >= 0"):
        sd3("a cat", **COMMON, pag_scale=-1)
    with pytest.raises(ValueError, match="pag_interval"):
        sd3("a cat", **COMMON, pag_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="valid heads are 0-3"):
        sd3.set_pag_heads("1.7")
    spy.close()
    assert spy.sizes == []


def test_defaults_from_pipe_and_set_pag_heads(sd3, flux):
    assert sd3.pag_heads == HeadSet([2])  # tiny 4-layer model: the middle layer stands in for layer 7
    stock = StableDiffusion3Pipeline(**sd3.components)
    pipe = StableDiffusion3HeadPAGPipeline.from_pipe(stock, pag_heads="3.1")
    assert pipe.pag_heads == HeadSet([(3, 1)])
    pipe.set_pag_heads(None)
    assert pipe.pag_heads == HeadSet([2])
    assert FluxHeadPAGPipeline.from_pipe(FluxPipeline(**flux.components)).pag_heads == HeadSet([2])
    out = pipe("a cat", **COMMON, generator=gen()).images  # default heads
    assert not torch.equal(out, stock("a cat", **COMMON, generator=gen()).images)


def test_targets_run_and_differ(flux):
    outs = {
        target: flux("a cat", **COMMON, pag_heads="1, 3", pag_target=target, generator=gen()).images
        for target in ("identity", "uniform", "query_mean")
    }
    assert not torch.allclose(outs["identity"], outs["uniform"]) and not torch.allclose(
        outs["uniform"], outs["query_mean"]
    )


def test_non_finite_guidance_is_refused_before_work(sd3):
    spy = BatchSpy(sd3.transformer)
    for name in ("guidance_scale", "strength"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number, got nan"):
            sd3("a cat", **COMMON, **{name: float("nan")})
    with pytest.raises(ValueError, match="pag_scale must be a finite number >= 0, got inf"):
        sd3("a cat", **COMMON, pag_scale=float("inf"))
    spy.close()
    assert spy.sizes == []
