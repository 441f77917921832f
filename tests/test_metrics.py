"""CLIP score and PickScore on tiny random models saved to local files, against direct computations."""

from __future__ import annotations

import pytest
import torch
from conftest import write_tiny_clip_config
from PIL import Image

from headpag.eval import ClipScore, PickScore
from headpag.pipelines.tiny import _clip_tokenizer


IMAGES = [Image.new("RGB", (40, 40), (i * 60, 20, 200 - i * 50)) for i in range(3)]
PROMPTS = ["a red cat", "a blue dog", "a lighthouse"]


def test_clip_score_equals_direct_open_clip(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    config = write_tiny_clip_config(tmp_path / "tiny-clip-m.json")
    torch.manual_seed(0)
    metric = ClipScore(str(config), device="cpu")
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
