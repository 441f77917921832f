"""CLIP score and PickScore on tiny random models saved to local files, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP, write_tiny_clip_checkpoint, write_tiny_clip_config
from PIL import Image

from headpag.eval import ClipScore, PickScore
from headpag.models.tiny import _clip_tokenizer


IMAGES = [Image.new("RGB", (40, 40), (i * 60, 20, 200 - i * 50)) for i in range(3)]
PROMPTS = ["a red cat", "a blue dog", "a lighthouse"]


def test_clip_score_equals_direct_open_clip(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    config, checkpoint = write_tiny_clip_checkpoint(tmp_path, "tiny-clip-m")
    metric = ClipScore(str(config), checkpoint=checkpoint, device="cpu")
    save_file(metric.model.state_dict(), tmp_path / "w.safetensors")
    torch.manual_seed(1)  # different random init: the checkpoint must override it
    loaded = ClipScore(str(config), checkpoint=tmp_path / "w.safetensors", device="cpu", batch_size=2)
    torch.save(metric.model.state_dict(), tmp_path / "w.pt")
    from_pt = ClipScore(str(config), checkpoint=tmp_path / "w.pt", device="cpu")
    model, tokenizer, preprocess = metric.model, open_clip.get_tokenizer("tiny-clip-m"), metric.preprocess
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in IMAGES]))
        txt = model.encode_text(tokenizer(PROMPTS))
        direct = (100 * torch.nn.functional.cosine_similarity(img, txt)).clamp(min=0).tolist()
    assert loaded(IMAGES, PROMPTS) == pytest.approx(direct, abs=1e-4)
    assert from_pt(IMAGES, PROMPTS) == pytest.approx(direct, abs=1e-4)
    loaded.update(IMAGES[:2], PROMPTS[:2])
    loaded.update(IMAGES[2:], PROMPTS[2:])
    assert loaded.compute() == pytest.approx(sum(direct) / 3, abs=1e-4)
    with pytest.raises(ValueError, match="does not exist"):
        ClipScore(str(config), checkpoint=tmp_path / "missing.safetensors")


def test_metrics_never_run_on_random_weights(tmp_path, monkeypatch):
    from headpag.eval import ClipFeatures, PickScore
    from headpag.search.objectives import load_objective

    monkeypatch.delenv("HEADPAG_CLIP_CHECKPOINT", raising=False)
    config = write_tiny_clip_config(tmp_path / "tiny-clip-r.json")
    for make in (
        lambda: ClipScore(str(config)),
        lambda: ClipFeatures(str(config)),
        lambda: load_objective("clip", arch=str(config)),
    ):
        with pytest.raises(ValueError, match=r"No weights for the CLIP model .*--clip-checkpoint FILE"):
            make()
    with pytest.raises(ValueError, match=r"PickScore weights could not be loaded .*--pickscore-model DIR"):
        PickScore(str(tmp_path / "no-such-folder"))
    _, checkpoint = write_tiny_clip_checkpoint(tmp_path, "tiny-clip-r")
    monkeypatch.setenv("HEADPAG_CLIP_CHECKPOINT", str(checkpoint))
    assert ClipScore(str(config))(IMAGES[:1], PROMPTS[:1])  # the environment variable supplies the weights


def test_pickscore_from_local_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=_clip_tokenizer()).save_pretrained(tmp_path)
    metric = PickScore(str(tmp_path), device="cpu", batch_size=2)
    scores = metric(IMAGES, PROMPTS)
    processor = CLIPProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        pixel = processor(images=IMAGES, return_tensors="pt")["pixel_values"]
        text = processor(text=PROMPTS, padding=True, return_tensors="pt")
        img = model.get_image_features(pixel_values=pixel)
        txt = model.get_text_features(**text)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        direct = (model.logit_scale.exp() * torch.nn.functional.cosine_similarity(img, txt)).tolist()
    assert scores == pytest.approx(direct, abs=1e-4)
    # The differentiable path: same scores at the processor's resolution, gradients reach the pixels.
    at_size = [im.resize((32, 32)) for im in IMAGES]
    pixels = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1) for im in at_size])
    pixels.requires_grad_(True)
    tensor_scores = metric(pixels, PROMPTS)
    assert metric.differentiable and tensor_scores.shape == (3,)
    assert tensor_scores.tolist() == pytest.approx(metric(at_size, PROMPTS), abs=1e-3)
    tensor_scores.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- FID / KID
def _random_inception_file(path):
    """Random FID-Inception weights with variance-preserving convs (default init collapses the features to ~0)."""
    from headpag.eval.features import fid_inception_v3

    torch.manual_seed(0)
    net = fid_inception_v3()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def _noise_images(seed, n, shift=0.0):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, shift, 48)[None, :, None]
    return [Image.fromarray((rng.random((48, 48, 3)) * (255 - shift) + ramp).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    from headpag.eval import InceptionFeatures

    return InceptionFeatures(_random_inception_file(tmp_path_factory.mktemp("inc") / "inc.pth"), device="cpu")


def test_fid_and_kid_between_sets(inception, tmp_path):
    from headpag._io import save_png
    from headpag.eval import FID, KID

    a, b = _noise_images(0, 6), _noise_images(1, 6, shift=170)
    for i, im in enumerate(a):
        save_png(im, tmp_path / "a" / f"{i}.png")
    fid = FID(inception)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid(tmp_path / "a", a) == pytest.approx(0.0, abs=1e-6)  # folder == in-memory list
    assert fid(a, b) > 1.0
    kid = KID(inception, subsets=20, subset_size=4)
    same, different = kid(a, a), kid(a, b)
    assert abs(same[0]) < 0.05 * different[0] and different[0] > 0
    kid.reset()
    kid.update(a[:3], real=True)
    kid.update(a[3:], real=True)
    kid.update(b, real=False)
    assert kid.compute() == pytest.approx(different)
    with pytest.raises(ValueError, match="needs both"):
        FID(inception).compute()


def test_frechet_distance_equals_pytorch_fid_when_well_conditioned():
    from pytorch_fid.fid_score import calculate_frechet_distance

    from headpag.eval import frechet_distance

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(300, 8)) * 1.5 + 0.3
    expected = calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)  # D x D path (n1 n2 > D^2)
    small_x, small_y = x[:5], y[:4]  # n1 n2 <= D^2: the nuclear-norm path, checked against sqrtm
    expected = calculate_frechet_distance(
        small_x.mean(0), np.cov(small_x, rowvar=False), small_y.mean(0), np.cov(small_y, rowvar=False)
    )
    assert frechet_distance(small_x, small_y) == pytest.approx(expected, rel=1e-6)


def test_kernel_distance_matches_its_definition():
    from headpag.eval import kernel_distance

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 1
    k = lambda a, b: (a @ b.T / 3 + 1) ** 3  # noqa: E731
    off = 5 * 4
    direct = (k(x, x).sum() - np.trace(k(x, x))) / off + (k(y, y).sum() - np.trace(k(y, y))) / off - 2 * k(x, y).mean()
    mean, std = kernel_distance(x, y, subsets=3, subset_size=5)  # subsets of all rows: one value
    assert mean == pytest.approx(direct) and std == pytest.approx(0.0, abs=1e-12)
    assert kernel_distance(x, y, subsets=3) == (mean, std)  # default: min(1000, both sets) = 5


def test_kid_subset_larger_than_the_sets_is_refused():
    from headpag.eval import kernel_distance
    from headpag.eval.distribution import kid_subset_size

    x = np.zeros((6, 3))
    with pytest.raises(ValueError, match=r"KID subset size 10 is larger than the sets \(6 reference, 4 generated"):
        kernel_distance(x, x[:4], subset_size=10)
    assert kid_subset_size(6, 4) == 4 and kid_subset_size(5000, 3000) == 1000 and kid_subset_size(6, 4, 3) == 3


def test_missing_inception_weights_error_says_what_to_do(tmp_path, monkeypatch):
    from headpag.eval import InceptionFeatures, MissingWeightsError
    from headpag.eval.features import INCEPTION_FILE, inception_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HEADPAG_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(MissingWeightsError, match=f"{tmp_path / 'nope.pth'}.*does not exist.*{INCEPTION_FILE}"):
        InceptionFeatures(tmp_path / "nope.pth")
    monkeypatch.setenv("HEADPAG_INCEPTION_WEIGHTS", str(tmp_path / "env.pth"))
    with pytest.raises(MissingWeightsError, match="HEADPAG_INCEPTION_WEIGHTS.*--inception-weights"):
        inception_weights_path()
    monkeypatch.delenv("HEADPAG_INCEPTION_WEIGHTS")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MissingWeightsError, match=f"network unreachable.*{INCEPTION_FILE}.*--inception-weights"):
        inception_weights_path()
    _random_inception_file(tmp_path / "env.pth")
    monkeypatch.setenv("HEADPAG_INCEPTION_WEIGHTS", str(tmp_path / "env.pth"))
    assert inception_weights_path() == tmp_path / "env.pth"


def test_clip_features_fid(tmp_path):
    from headpag.eval import FID, ClipFeatures, ClipScore

    config, checkpoint = write_tiny_clip_checkpoint(tmp_path, "tiny-clip-f")
    features = ClipFeatures(str(config), checkpoint, device="cpu")
    a, b = _noise_images(0, 4), _noise_images(1, 4, shift=170)
    assert features(a).shape == (4, TINY_CLIP["embed_dim"])
    assert np.allclose(np.linalg.norm(features(a), axis=1), 1.0)
    fid = FID(features)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9) and fid(a, b) > 0
    assert ClipScore(str(config), checkpoint, device="cpu")  # the same loader serves both


def test_cmmd_and_prdc_against_their_definitions():
    from headpag.eval.distribution import cmmd, precision_recall_density_coverage

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 4)), rng.normal(size=(6, 4)) + 0.5
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * 10.0**2))  # noqa: E731
    mean = lambda a, b: np.mean([[k(p, q) for q in b] for p in a])  # noqa: E731
    assert cmmd(x, y) == pytest.approx(1000 * (mean(x, x) + mean(y, y) - 2 * mean(x, y)), rel=1e-9)
    assert cmmd(x, x) == pytest.approx(0.0, abs=1e-9)
    # precision: share of fake points inside some real point's k-NN ball (Kynkäänniemi et al.), written out here
    kth = lambda a: np.sort(np.linalg.norm(a[:, None] - a[None], axis=-1), axis=1)[:, 3]  # noqa: E731
    real_radius = kth(x)
    distances = np.linalg.norm(x[:, None] - y[None], axis=-1)  # (real, fake)
    precision = np.mean((distances < real_radius[:, None]).any(axis=0))
    coverage = np.mean(distances.min(axis=1) < real_radius)
    result = precision_recall_density_coverage(x, y, nearest_k=3)
    assert result["precision"] == pytest.approx(precision) and result["coverage"] == pytest.approx(coverage)
    with pytest.raises(ValueError, match="need more than 5 images per set"):
        precision_recall_density_coverage(x[:4], y)


def test_a_checkpoint_that_does_not_fit_is_refused_before_the_model_is_built(tmp_path):
    """The checkpoint's header is compared with the model built on the meta device: a 2.5-billion-parameter model
    named with any file is refused without allocating it."""
    import resource

    from safetensors.torch import load_file, save_file

    from headpag.eval import ClipScore
    from headpag.eval.clip_score import checkpoint_shapes

    config, checkpoint = write_tiny_clip_checkpoint(tmp_path, "tiny-clip-fit")
    assert checkpoint_shapes(checkpoint) == {k: tuple(v.shape) for k, v in load_file(checkpoint).items()}
    ClipScore(str(config), checkpoint=checkpoint, device="cpu")  # the right file loads
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="does not fit the CLIP model 'ViT-bigG-14'.*nothing was built"):
        ClipScore("ViT-bigG-14", checkpoint=checkpoint, device="cpu")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 500_000  # kB: far below its 10 GB
    state = load_file(checkpoint)
    state.pop(next(iter(state)))
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="1 parameter\\(s\\) missing"):
        ClipScore(str(config), checkpoint=tmp_path / "partial.safetensors", device="cpu")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable checkpoint"):
        ClipScore(str(config), checkpoint=tmp_path / "junk.safetensors", device="cpu")


def test_a_torch_checkpoint_is_checked_before_torch_reads_it(tmp_path):
    """A compressed entry (a zip bomb in `data.pkl`) or an entry that is not a tensor is refused from the archive."""
    import zipfile

    from headpag.eval.clip_score import checkpoint_shapes

    good = tmp_path / "good.pt"
    torch.save({"module.w": torch.zeros(2, 3)}, good)
    assert checkpoint_shapes(good) == {"w": (2, 3)}
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(ValueError, match="bomb.pt is not a readable checkpoint"):
        checkpoint_shapes(bomb)
    mixed = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(2), "step": 3}, mixed)
    with pytest.raises(ValueError, match="mixed.pt is not a readable checkpoint"):
        checkpoint_shapes(mixed)
