"""`headpag eval`: comparison runs on a tiny pipeline with random-weight metric models saved to local files."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_clip_checkpoint
from PIL import Image
from test_metrics import _noise_images, _random_inception_file

from headpag._io import save_png
from headpag.cli import main
from headpag.cli.evaluate import parse_eval_config
from headpag.eval import ClipScore
from headpag.pipelines.settings import GenerationSettings


SMALL = "--guidance-scale 1 --steps 2 --height 32 --width 32"


@pytest.fixture(scope="module")
def metric_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    config, checkpoint = write_tiny_clip_checkpoint(root, "tiny-clip-e")
    os.replace(checkpoint, root / "clip.safetensors")
    reference = root / "reference"
    for i, im in enumerate(_noise_images(3, 4)):
        save_png(im, reference / f"{i}.png")
    return {
        "clip_model": str(config),
        "clip_checkpoint": str(root / "clip.safetensors"),
        "inception": str(_random_inception_file(root / "inception.pth")),
        "reference": str(reference),
    }


def _eval(out, metric_files, configs, metrics="clip,fid,kid", extra=()):
    argv = ["eval", "--model", "tiny-sd3", "--prompts", str(out.parent / "prompts.txt"), "--seeds", "0-1"]
    for c in configs:
        argv += ["--config", c]
    argv += [
        "--metrics",
        metrics,
        "--clip-model",
        metric_files["clip_model"],
        "--clip-checkpoint",
        metric_files["clip_checkpoint"],
        "--inception-weights",
        metric_files["inception"],
        "--reference-images",
        metric_files["reference"],
        "--kid-subsets",
        "5",
        "--cache-dir",
        str(out.parent / "feature-cache"),
        "--output-dir",
        str(out),
        "--no-progress",
        *extra,
    ]
    return main(argv)


def test_comparison_writes_report_and_reuses_images(tmp_path, metric_files, capsys):
    (tmp_path / "prompts.txt").write_text("a red cat\n# a comment\na lighthouse at dusk\n")
    out = tmp_path / "run"
    configs = [
        f"baseline={SMALL}",
        f"pag-layer=--pag-heads 1 {SMALL}",
        f"soft: --pag-heads 1.0-1 --pag-identity-weight 0.5 {SMALL}",
    ]
    assert _eval(out, metric_files, configs) == 0
    assert "12 generated, 0 reused" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["configurations"]}
    assert list(rows) == ["baseline", "pag-layer", "soft"]
    for row in rows.values():
        assert row["count"] == 4 and set(row["metrics"]) == {"clip", "fid", "kid"}
        lo, hi = row["metrics"]["clip"]["ci95"]
        assert lo <= row["metrics"]["clip"]["mean"] <= hi
        assert row["metrics"]["fid"]["value"] > 0 and row["metrics"]["fid"]["generated"] == 4
        assert row["metrics"]["fid"]["ci95"][0] <= row["metrics"]["fid"]["ci95"][1]
        assert "biased upward" in row["metrics"]["fid"]["warning"]  # 4 < 2048 images
        kid = row["metrics"]["kid"]
        assert {"mean", "std"} <= set(kid) and (kid["subset_size"], kid["reference"]) == (4, 4)
    provenance = report["settings"]["provenance"]
    clip_info = provenance["metrics"]["clip"]
    assert clip_info["weights"] == str(metric_files["clip_checkpoint"])
    assert (
        clip_info["weights_sha256"] == hashlib.sha256(Path(metric_files["clip_checkpoint"]).read_bytes()).hexdigest()
    )
    assert "bilinear to 299x299" in provenance["features"]["resize"] and provenance["features"]["weights_sha256"]
    assert provenance["libraries"]["torch"] and provenance["libraries"]["diffusers"]
    assert provenance["images"] == {"baseline": 4, "pag-layer": 4, "soft": 4} and provenance["command"]
    assert report["paired"]["baseline"] == "baseline" and set(report["paired"]["comparisons"]) == {"pag-layer", "soft"}
    # per-image CLIP scores equal the metric applied directly to the stored images
    clip = ClipScore(metric_files["clip_model"], checkpoint=metric_files["clip_checkpoint"], device="cpu")
    images = [Image.open(p) for p in rows["soft"]["images"]]
    assert rows["soft"]["per_image"]["clip"] == pytest.approx(clip(images, rows["soft"]["prompts"]), abs=1e-5)
    assert rows["soft"]["prompts"] == ["a red cat"] * 2 + ["a lighthouse at dusk"] * 2
    # PAG changes the images; the baseline has none
    baseline, pag = (Image.open(rows[n]["images"][0]) for n in ("baseline", "pag-layer"))
    assert json.loads(baseline.text["headpag"])["pag_scale"] == 0.0
    assert baseline.tobytes() != pag.tobytes()
    md = (out / "report.md").read_text()
    assert "| pag-layer | `--pag-heads 1" in md and "FID (lower is better)" in md
    for name in ("plots/clip.png", "plots/fid.png", "plots/kid.png", "grids/grid_0.png"):
        assert Image.open(out / name).size[0] > 0
    grid = Image.open(out / "grids/grid_0.png")
    # one column per configuration, one row per pair, prompt and seed labels on the left
    assert grid.size[1] == 16 + 4 * 32 and grid.size[0] > 3 * 32

    # a second run reuses every image; a changed configuration regenerates only its own
    configs[1] = f"pag-layer=--pag-heads 2 {SMALL}"
    assert _eval(out, metric_files, configs, metrics="clip") == 0
    assert "4 generated, 8 reused" in capsys.readouterr().out
    assert _eval(out, metric_files, configs, metrics="clip") == 0
    assert "0 generated, 12 reused" in capsys.readouterr().out


def test_scoring_existing_images(tmp_path, metric_files, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, im in enumerate(_noise_images(5, 3)):
        im.save(folder / f"{i}.png")  # no metadata: prompts come from the file, in name order
    (tmp_path / "prompts.txt").write_text("one\ntwo\nthree\n")
    argv = ["eval", "--images", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--metrics", "clip,fid,cmmd"]
    argv += ["--clip-model", metric_files["clip_model"], "--clip-checkpoint", metric_files["clip_checkpoint"]]
    argv += ["--inception-weights", metric_files["inception"], "--reference-images", metric_files["reference"]]
    argv += ["--output-dir", str(tmp_path / "scored"), "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "scored/report.json").read_text())["configurations"]
    assert [r["name"] for r in rows] == ["mine"] and rows[0]["prompts"] == ["one", "two", "three"]
    assert rows[0]["metrics"]["cmmd"]["value"] >= 0 and rows[0]["metrics"]["cmmd"]["generated"] == 3
    assert "CMMD" in (tmp_path / "scored/report.md").read_text()
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    assert main(argv) == 2
    assert "Cannot pair the 3 images" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("one\ntwo\nthree\n")
    (folder / "sub").mkdir()  # images beside a sub-folder of images: refused, none silently left out
    _noise_images(5, 1)[0].save(folder / "sub" / "0.png")
    assert main(argv) == 2
    assert "holds 3 image(s) beside 1 sub-folder(s) of images" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "bad name=--steps 2"], "Invalid --config 'bad name=--steps 2'"),
        (["--config", "x=--pag-heads 1 --bogus 3"], "Invalid options for configuration 'x'.*--bogus"),
        (["--config", "x=--steps 2", "--config", "x=--steps 3"], "unique; repeated: x"),
        (["--config", "x=--steps 2", "--metrics", "clip,fd"], r"Unknown metric\(s\) \['fd'\]; allowed: clip"),
        (["--config", "x=--steps 2", "--metrics", "fid"], "need --reference-images"),
        (
            ["--config", "ok=--steps 1", "--config", "x=--pag-heads 9 --steps 1"],
            "out of range: layer 9 does not exist; valid layers are 0-3",
        ),
    ],
)
def test_eval_bad_input(tmp_path, capsys, argv, message):
    (tmp_path / "p.txt").write_text("a cat\n")
    base = ["eval", "--model", "tiny-sd3", "--prompts", str(tmp_path / "p.txt"), "--output-dir", str(tmp_path / "o")]
    assert main([*base, *argv, "--no-progress"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o" / "images").exists()  # nothing generated before the error


def test_config_parsing_and_bootstrap():
    assert parse_eval_config("cfg=--guidance-scale 5").settings.pag_scale == 0.0
    c = parse_eval_config("pag: --pag-heads '7, 3.1' --pag-identity-weight 0.5")
    assert (c.name, c.settings.pag_heads, c.settings.pag_scale, c.settings.pag_identity_weight) == (
        "pag",
        "7, 3.1",
        None,  # the model's recommendation, else 3.0 (spelled out by with_model_defaults once the model is loaded)
        0.5,
    )
    assert parse_eval_config("s=--pag-scale 2").settings.pag_scale == 2.0  # default heads
    c = parse_eval_config("short=--guidance-scale 5 --max-sequence-length 1")
    assert c.settings.max_sequence_length == 1 and c.settings.call_kwargs("sd3")["max_sequence_length"] == 1
    with pytest.raises(ValueError, match="max_sequence_length must be an integer in \\[1, 512\\].*got 513"):
        GenerationSettings(max_sequence_length=513).check()


def test_two_parameter_sweep_writes_plots_and_reuses_images(tmp_path, metric_files, capsys):
    (tmp_path / "prompts.txt").write_text("a red cat\n")
    out = tmp_path / "sweep"
    sweeps = ["--sweep", "pag_scale=1,2", "--sweep", "pag_identity_weight=0.5,1"]
    configs = [f"base=--pag-heads 1 {SMALL}"]
    assert _eval(out, metric_files, configs, metrics="clip", extra=sweeps) == 0
    assert "10 generated" in capsys.readouterr().out  # 5 configurations x 2 seeds
    report = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in report["configurations"]]
    assert names[0] == "base" and "base[pag_scale=2.0,pag_identity_weight=0.5]" in names and len(names) == 5
    assert report["settings"]["sweeps"]["parameters"] == ["pag_scale", "pag_identity_weight"]
    assert Image.open(out / "plots" / "sweep_clip.png").size[0] > 0
    assert _eval(out, metric_files, configs, metrics="clip", extra=sweeps) == 0
    assert "0 generated, 10 reused" in capsys.readouterr().out


def test_top_k_sweep_takes_heads_from_a_search_run(tmp_path):
    from headpag.cli.evaluate import expand_sweeps, parse_sweep

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config_hash": "h", "config": {}}))
    lines = [
        {"round": 0, "layer": layer, "head": head, "score": score, "config_hash": "h"}
        for layer, head, score in [(1, 0, 0.2), (2, 3, 0.9), (0, 1, 0.5)]
    ]
    (run / "journal.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    configs, values = expand_sweeps(None, [parse_sweep("top_k=1,2")], str(run))
    assert [c.settings.pag_heads for c in configs] == ["2.3", "0.1, 2.3"]
    assert values == {"top_k=1": {"top_k": 1}, "top_k=2": {"top_k": 2}}
    with pytest.raises(ValueError, match=r"top_k=4: the run .* ranked 3 heads"):
        expand_sweeps(None, [parse_sweep("top_k=4")], str(run))
    with pytest.raises(ValueError, match="add --search-run"):
        expand_sweeps(None, [parse_sweep("top_k=1")])
    with pytest.raises(ValueError, match="Invalid --sweep 'color=1'"):
        parse_sweep("color=1")


def test_reference_features_are_cached_by_content_and_model(tmp_path):
    from headpag.eval.distribution import cached_reference_features

    folder = tmp_path / "ref"
    folder.mkdir()
    for i, im in enumerate(_noise_images(7, 3)):
        im.save(folder / f"{i}.png")
    calls = []

    class Counting:
        name, provenance = "counting", {"weights_sha256": "w1"}

        def __call__(self, images):
            calls.append(len(images))
            return np.arange(len(images) * 2, dtype=np.float64).reshape(-1, 2)

    first = cached_reference_features(folder, Counting(), tmp_path / "cache")
    again = cached_reference_features(folder, Counting(), tmp_path / "cache")
    assert calls == [3] and np.array_equal(first, again)
    other = Counting()
    other.provenance = {"weights_sha256": "w2"}  # another model: not the cached features
    cached_reference_features(folder, other, tmp_path / "cache")
    _noise_images(8, 1)[0].save(folder / "0.png")  # a changed image: not the cached features
    cached_reference_features(folder, Counting(), tmp_path / "cache")
    assert calls == [3, 3, 3]


def test_plots_draw_intervals_that_do_not_contain_their_point():
    """A bootstrap interval of FID lies above the point value (resampling repeats images): plots must draw it."""
    from headpag.eval.report import bar_plot_png, sweep_plot_png

    rows = [
        {"name": "a", "metrics": {"fid": {"value": 1.0, "ci95": [1.5, 2.5]}, "s": {"mean": 1.0, "ci95": [1.0, 1.0]}}},
        {"name": "b", "metrics": {"fid": {"value": 2.0, "ci95": [2.2, 3.1]}, "s": {"mean": 0.9, "ci95": [0.92, 1.0]}}},
    ]
    for metric in ("fid", "s"):
        assert bar_plot_png(rows, metric).startswith(b"\x89PNG")
        sweeps = {"parameters": ["k"], "values": {"a": {"k": 1}, "b": {"k": 2}}}
        assert sweep_plot_png(rows, sweeps, metric).startswith(b"\x89PNG")
