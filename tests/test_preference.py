"""LAION aesthetic and HPSv2 on tiny checkpoints built here, against their definitions written out in the tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_tiny_clip_checkpoint
from PIL import Image

from headpag.eval.preference import AestheticScore, HPSv2Score, linear_stack


def images(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def write_laion_head(path, dims=(32, 16, 8, 1), seed=0):
    """A small head in the LAION predictor's format: `layers.<i>` Linear entries with dropouts in between, written
    as a torch file (the original is a `.pth`)."""
    torch.manual_seed(seed)
    layers, index = {}, 0
    for a, b in zip(dims, dims[1:]):
        linear = torch.nn.Linear(a, b)
        layers[f"layers.{index}.weight"], layers[f"layers.{index}.bias"] = linear.weight.data, linear.bias.data
        index += 2  # a Dropout sits between Linear layers in the original
    torch.save(layers, path)
    return path, layers


def test_aesthetic_equals_its_definition(tmp_path):
    import open_clip

    config, checkpoint = write_tiny_clip_checkpoint(tmp_path)
    head, state = write_laion_head(tmp_path / "head.pth")
    metric = AestheticScore(head, str(config), checkpoint=checkpoint)
    batch = images()
    scores = metric(batch, ["ignored"] * len(batch))
    # the definition: MLP(normalize(CLIP image embedding)), with the open_clip preprocess
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip")
    from headpag.eval import load_state_dict

    model.load_state_dict(load_state_dict(checkpoint))
    model.eval()
    with torch.no_grad():
        x = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(i) for i in batch])), dim=-1)
        for i in (0, 2):
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
        expected = (x @ state["layers.4.weight"].T + state["layers.4.bias"])[:, 0]
    assert np.allclose(scores, expected.numpy(), atol=1e-5)
    assert metric.provenance["head_sha256"] and "aesthetic" in metric.provenance["implementation"].lower()
    # differentiable: the tensor path equals the PIL path at the model's resolution
    pixels = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255).permute(2, 0, 1) for i in batch])
    pixels.requires_grad_(True)
    t = metric(pixels, [""] * len(batch))
    t.sum().backward()
    assert np.allclose(t.detach().numpy(), scores, atol=1e-3) and pixels.grad.abs().sum() > 0


def test_hpsv2_equals_its_definition(tmp_path):
    import open_clip

    config, checkpoint = write_tiny_clip_checkpoint(tmp_path, seed=3)
    # HPS checkpoints keep the weights under 'state_dict' in a torch file
    from safetensors.torch import load_file

    wrapped = tmp_path / "hps.pt"
    torch.save({"state_dict": load_file(str(checkpoint))}, wrapped)
    metric = HPSv2Score(wrapped, model_name=str(config))
    batch, prompts = images(3, seed=1), ["a cat", "a dog", "a red square"]
    scores = metric(batch, prompts)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip")
    model.load_state_dict(load_file(str(checkpoint)))
    model.eval()
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(i) for i in batch])), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer("tiny-clip")(prompts)), dim=-1)
    assert np.allclose(scores, (img * txt).sum(-1).numpy(), atol=1e-5)
    assert metric.differentiable


def test_missing_weights_name_the_file_and_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("HEADPAG_AESTHETIC_HEAD", raising=False)
    monkeypatch.delenv("HEADPAG_HPS_CHECKPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="sac\\+logos\\+ava1-l14-linearMSE.pth.*--aesthetic-head"):
        AestheticScore(None)
    with pytest.raises(ValueError, match="HPS_v2.1_compressed.pt.*--hps-checkpoint"):
        HPSv2Score(None)
    from headpag.search import load_objective

    with pytest.raises(ValueError, match="--aesthetic-head"):
        load_objective("aesthetic")


def test_eval_cli_without_weights_fails_clearly(tmp_path, monkeypatch, capsys):
    from headpag.cli import main

    monkeypatch.delenv("HEADPAG_AESTHETIC_HEAD", raising=False)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, im in enumerate(images(2)):
        im.save(folder / f"{k}.png")
    (tmp_path / "p.txt").write_text("a\nb\n")
    code = main(["eval", "--images", str(folder), "--prompts", str(tmp_path / "p.txt"), "--metrics", "aesthetic",
                 "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert code != 0
    assert "--aesthetic-head" in capsys.readouterr().err


def test_linear_stack_rejects_what_is_not_a_head():
    with pytest.raises(ValueError, match="no 'layers"):
        linear_stack({"weight": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="do not chain"):
        linear_stack({"layers.0.weight": torch.zeros(4, 2), "layers.1.weight": torch.zeros(1, 3)})
