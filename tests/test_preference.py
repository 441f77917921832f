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
    monkeypatch.delenv("HEADPAG_IMAGEREWARD_CHECKPOINT", raising=False)
    with pytest.raises(ValueError, match="ImageReward.pt"):
        load_objective("imagereward")


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


def test_imagereward_equals_an_independent_blip(tmp_path):
    """Our transformers-BLIP ImageReward against imscore's own BLIP modules (the reference), on a tiny checkpoint
    in ImageReward's original key names."""
    import imscore.imreward.bert as imscore_bert
    import imscore.imreward.vit as imscore_vit
    from transformers import BertConfig, BertTokenizer

    from headpag.eval.preference import IMAGEREWARD_MEAN, IMAGEREWARD_STD, ImageRewardScore

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "on", "blue", "square"]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "tok" / "vocab.txt")).save_pretrained(tmp_path / "tok")
    vocab = len(words) + 2  # + [DEC], [ENC]
    torch.manual_seed(0)
    vit = imscore_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    with torch.no_grad():  # zero-initialised in imscore: give them values
        vit.cls_token.normal_()
        vit.pos_embed.normal_(std=0.5)
    config = BertConfig(vocab_size=vocab, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=40, pad_token_id=0)  # fmt: skip
    config.encoder_width = 32
    bert = imscore_bert.BertModel(config).eval()
    head = torch.nn.Sequential(torch.nn.Linear(24, 8), torch.nn.Dropout(), torch.nn.Linear(8, 1)).eval()
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in bert.state_dict().items()}
    state |= {f"mlp.layers.{k}": v for k, v in head.state_dict().items()}
    state["blip.vision_proj.weight"] = torch.zeros(4, 32)  # in real checkpoints, unused for the reward
    torch.save(state, tmp_path / "ImageReward.pt")

    metric = ImageRewardScore(
        tmp_path / "ImageReward.pt", str(tmp_path / "tok"),
        vision=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu"),
        text=dict(vocab_size=vocab, hidden_size=24, encoder_hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu",
                  is_decoder=True),
    )  # fmt: skip
    batch, prompts = images(3, seed=2), ["a red cat", "a dog on a blue square", "cat"]
    scores = metric(batch, prompts)
    # the reference: imscore's modules, ImageReward's preprocessing and scoring written out
    from torchvision import transforms

    pre = transforms.Compose([transforms.ToTensor(), transforms.Normalize(
        (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])  # fmt: skip
    tok = BertTokenizer.from_pretrained(tmp_path / "tok")
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    text = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        embeds = vit(torch.stack([pre(i) for i in batch]))
        out = bert(text.input_ids, text.attention_mask, embeds, torch.ones(embeds.shape[:2]))[:, 0]
        expected = (head(out)[:, 0] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
    assert np.allclose(scores, expected.numpy(), atol=1e-4), (scores, expected)
    assert len(set(np.round(scores, 4))) == 3  # the prompts matter
    pixels = torch.stack([transforms.functional.to_tensor(i) for i in batch]).requires_grad_(True)
    metric(pixels, prompts).sum().backward()
    assert pixels.grad.abs().sum() > 0


def test_imagereward_without_weights_fails_clearly(monkeypatch):
    from headpag.eval.preference import ImageRewardScore

    monkeypatch.delenv("HEADPAG_IMAGEREWARD_CHECKPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="ImageReward.pt.*--imagereward-checkpoint.*HEADPAG_IMAGEREWARD_CHECKPOINT"):
        ImageRewardScore(None)
