"""`headpag generate` end to end on the offline tiny models."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from headpag import HeadSet
from headpag.cli import main
from headpag.options import Limits


FAST = ["--steps", "2", "--height", "32", "--width", "32", "--no-progress"]


def settings_of(path):
    return json.loads(Image.open(path).text["headpag"])


def test_generate_compare_writes_both_images(tmp_path):
    out = tmp_path / "cat.png"
    rc = main(
        [
            "generate",
            "--model",
            "tiny-sd3",
            "--prompt",
            "a cat",
            "--pag-heads",
            "1.0-1, 2",
            "--compare",
            "--guidance-scale",
            "4",
            "--seed",
            "7",
            "--output",
            str(out),
            *FAST,
        ]
    )
    assert rc == 0
    pag, nopag = settings_of(out), settings_of(tmp_path / "cat-nopag.png")
    assert pag["pag_heads"] == "1.0-1, 2" and pag["seed"] == 7 and pag["pag_scale"] == 3.0
    assert nopag["pag_scale"] == 0.0 and nopag["seed"] == 7
    assert Image.open(out).tobytes() != Image.open(tmp_path / "cat-nopag.png").tobytes()


def test_generate_from_head_set_file_uses_its_metadata(tmp_path):
    heads = HeadSet.parse("0.1, 3.0").save(tmp_path / "heads.json", recommended_scale=2.5, identity_weight=0.25)
    rc = main(
        [
            "generate",
            "--model",
            "tiny-flux",
            "--prompt",
            "a cat",
            "--pag-heads-file",
            str(heads),
            "--negative-prompt",
            "blur",
            "--true-cfg-scale",
            "2",
            "--num-images",
            "2",
            "--output",
            str(tmp_path / "f.png"),
            *FAST,
        ]
    )
    assert rc == 0
    s = settings_of(tmp_path / "f-1.png")
    assert s["pag_heads"] == "0.1, 3.0" and s["pag_scale"] == 2.5 and s["pag_identity_weight"] == 0.25
    assert s["true_cfg_scale"] == 2.0


def test_generate_img2img(tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(src)
    rc = main(
        [
            "generate",
            "--model",
            "tiny-sd35",
            "--prompt",
            "a cat",
            "--image",
            str(src),
            "--strength",
            "0.5",
            "--steps",
            "4",
            "--no-progress",
            "--output",
            str(tmp_path / "i.png"),
        ]
    )
    assert rc == 0 and settings_of(tmp_path / "i.png")["strength"] == 0.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "tiny-sd3", "--pag-heads", "9"], "valid layers are 0-3"),
        (["--model", "tiny-sd3", "--pag-identity-weight", "1.5"], r"must be a number in \[0, 1\]"),
        (["--model", "tiny-sd3", "--true-cfg-scale", "3"], "applies to FLUX only"),
        (["--model", "tiny-sd3", "--pag-heads", "1.x"], "Invalid head spec entry"),
        (["--model", "tiny-xl"], "Hugging Face Hub could not be reached|does not exist|Unknown"),
    ],
)
def test_generate_errors_are_clear(tmp_path, capsys, args, message):
    rc = main(["generate", "--prompt", "a cat", *args, "--output", str(tmp_path / "x.png"), *FAST])
    assert rc == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_module_entry_point_and_exclusive_heads(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "headpag",
            "generate",
            "--model",
            "tiny-sd3",
            "--prompt",
            "x",
            "--pag-heads",
            "1",
            "--pag-heads-file",
            "h.json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "headpag", "generate", "--model", "tiny-sd3", "--prompt", "x", "--pag-heads", "7"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "valid layers are 0-3" in proc.stderr


GEN = ["generate", "--model", "tiny-sd3", "--prompt", "a cat", *FAST]


def run_main(argv):
    """`main`'s exit code, also for the usage errors argparse reports by exiting."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--guidance-scale", "nan"], 2, r"'nan' is not a finite number"),
        (["--pag-scale", "inf"], 2, r"'inf' is not a finite number"),
        (["--pag-scale", "1e38"], 2, r"pag_scale 1e\+38 is over the limit max_scale=100"),
        (["--num-images", "0"], 2, r"'0' must be > 0"),
        (["--device", "cuda:0"], 2, r"CUDA is not available on this machine; use --device cpu"),
        (["--image", "{tmp}/missing.png"], 2, r"Input image not found: .*missing.png"),
        (["--image", "{tmp}/notimage.png"], 2, r"is not an image PIL can read"),
        (["--output", "{tmp}/x.gif"], 2, r"unknown image type '.gif'"),
        (["--output", "{tmp}/notimage.png/sub/x.png"], 2, r"Output folder .* is not writable"),  # a file in the path
        (["--strength", "1.5", "--image", "{tmp}/in.png"], 2, r"--strength 1.5: must be in \(0, 1\]"),
    ],
)
def test_cli_errors_are_one_line_with_exit_codes(tmp_path, capsys, extra, code, message):
    (tmp_path / "notimage.png").write_text("not an image")
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    argv = [*GEN, "--output", str(tmp_path / "out.png"), *[a.format(tmp=tmp_path) for a in extra]]
    assert run_main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not list(tmp_path.glob("out*.png"))  # nothing written


def test_cli_runtime_error_exit_1_and_debug_traceback(tmp_path, capsys, monkeypatch):
    import headpag.models as pipelines

    def broken(*args, **kwargs):
        raise RuntimeError("the model exploded")

    monkeypatch.setattr(pipelines, "load_pipeline", broken)
    argv = [*GEN, "--output", str(tmp_path / "o.png")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "headpag generate: RuntimeError: the model exploded" in err and "Traceback" not in err
    assert main(["--debug", *argv]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_output_types_and_folders(tmp_path):
    assert main([*GEN, "--output", str(tmp_path / "a.jpg")]) == 0
    assert Image.open(tmp_path / "a.jpg").format == "JPEG"
    assert main([*GEN, "--output", str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "headpag.png").is_file()


def test_hunt_and_eval_refuse_missing_prompt_files_and_huge_seed_lists(tmp_path, capsys):
    import time

    base = ["--model", "tiny-sd3", "--no-progress"]
    assert (
        run_main(["hunt", *base, "--prompts", str(tmp_path / "prompts.txt"), "--output-dir", str(tmp_path / "r")]) == 2
    )
    assert "Prompt file not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    start = time.monotonic()
    argv = ["eval", *base, "--prompts", "a cat", "--seeds", "0-99999999999", "--config", "a=--pag-scale 1"]
    assert run_main([*argv, "--output-dir", str(tmp_path / "e")]) == 2
    assert "over the limit max_seeds=1000" in capsys.readouterr().err
    assert time.monotonic() - start < 30  # refused from the text, not by expanding the range


def test_parse_seeds_and_prompts_bounds(tmp_path):
    from headpag.options import parse_seeds, read_prompts

    assert parse_seeds("0-2, 7") == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="over the limit max_seeds=10"):
        parse_seeds("0-99999999999999", limit=10)
    for bad in ("-1", "a", "3-1", "1.5"):
        with pytest.raises(ValueError, match="seed"):
            parse_seeds(bad)
    assert read_prompts("a cat") == ["a cat"]
    with pytest.raises(ValueError, match="Prompt file not found"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "p.txt").write_text("# comment\na\nb\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a", "b"]
    with pytest.raises(ValueError, match="over the limit max_prompts=1"):
        read_prompts(str(tmp_path / "p.txt"), limit=1)


def test_presets_command_and_flag(capsys, tmp_path):
    assert run_main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "sd3-blue" in listing and "flux-golden-hour" in listing
    out = ["--output", str(tmp_path / "p.png")]
    assert run_main([*GEN, "--pag-heads-preset", "sd3-blue", *out]) == 2  # tiny 4 x 4 model, preset is 24 x 24
    err = capsys.readouterr().err
    assert "24" in err and "4" in err and "Traceback" not in err
    assert run_main([*GEN, "--pag-heads-preset", "no-such-preset", *out]) == 2
    assert "sd3-blue" in capsys.readouterr().err  # the known names are listed
    assert not (tmp_path / "p.png").exists()


def test_generate_with_pag_reuse_equals_the_pipeline(tmp_path, capsys):
    import torch

    from headpag import load_pipeline

    out = tmp_path / "reuse.png"
    argv = ["generate", "--model", "tiny-sd3", "--prompt", "a cat", "--pag-heads", "1", "--pag-reuse", "2"]
    assert main([*argv, "--seed", "3", "--output", str(out), "--steps", "4", "--height", "32", "--width", "32"]) == 0
    assert settings_of(out)["pag_reuse"] == 2
    pipe = load_pipeline("tiny-sd3")
    direct = pipe(
        "a cat", pag_heads="1", pag_reuse=2, num_inference_steps=4, height=32, width=32,
        generator=[torch.Generator().manual_seed(3)],
    ).images[0]  # fmt: skip
    assert Image.open(out).convert("RGB").tobytes() == direct.tobytes()
    assert run_main([*argv[:-1], "0", "--output", str(tmp_path / "x.png"), *FAST]) == 2
    assert "--pag-reuse: '0' must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["hunt", "--prompts", "a cat", "--pag-scale", "1e38"],
        ["hunt", "--prompts", "a cat", "--steps", "100000"],
        ["eval", "--prompts", "a cat", "--config", "c=--pag-scale 1e38"],
        ["eval", "--prompts", "a cat", "--config", "c=--pag-scale 1", "--sweep", "pag_scale=1,1e38"],
    ],
)
def test_hunt_and_eval_check_the_same_limits_as_generate(tmp_path, capsys, argv):
    out = ["--output-dir", str(tmp_path / "out")]
    assert run_main([argv[0], "--model", "tiny-sd3", "--no-progress", *argv[1:], *out]) == 2
    assert re.search(r"is over the limit max_(scale|steps)=", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_empty_head_field_means_the_default_heads_and_the_metadata_says_which(tmp_path, capsys):
    args = ["generate", "--model", "tiny-sd3", "--prompt", "a cat", "--seed", "1", *FAST]
    assert main([*args, "--pag-heads", "", "--output", str(tmp_path / "empty.png")]) == 0
    assert main([*args, "--output", str(tmp_path / "default.png")]) == 0
    for name in ("empty", "default"):
        assert settings_of(tmp_path / f"{name}.png")["pag_heads"] == "2"  # tiny-sd3's default: the middle layer
    assert Image.open(tmp_path / "empty.png").tobytes() == Image.open(tmp_path / "default.png").tobytes()
    empty = tmp_path / "empty.json"
    HeadSet([]).save(empty)
    assert run_main([*args, "--pag-heads-file", str(empty), "--output", str(tmp_path / "x.png")]) == 2
    assert "empty.json holds no heads" in capsys.readouterr().err


def test_flux_true_cfg_needs_a_negative_prompt_and_head_files_must_fit(tmp_path, capsys):
    flux = ["generate", "--model", "tiny-flux", "--prompt", "a cat", *FAST, "--output", str(tmp_path / "x.png")]
    assert run_main([*flux, "--true-cfg-scale", "2"]) == 2
    assert "true_cfg_scale=2.0 needs a negative prompt" in capsys.readouterr().err
    heads = tmp_path / "sd3.json"
    HeadSet.parse("1.0").save(heads, model_family="sd3", num_layers=4, num_heads=4)
    assert run_main([*flux, "--pag-heads-file", str(heads)]) == 2
    assert "was made for another model: model_family 'sd3' (the model's: 'flux')" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    evaluate = ["eval", "--model", "tiny-flux", "--prompts", "a cat", "--no-progress", "--metrics", "clip"]
    config = f"c=--pag-heads-file {heads} --steps 1 --height 32 --width 32"
    assert run_main([*evaluate, "--config", config, "--output-dir", str(tmp_path / "ev")]) == 2
    assert "was made for another model: model_family 'sd3'" in capsys.readouterr().err
    assert not (tmp_path / "ev" / "images").exists()


@pytest.mark.parametrize("command", ["generate", "hunt", "eval"])
def test_every_command_takes_the_work_limits_its_messages_name(tmp_path, capsys, command):
    """A limit message names a flag the command has: `--max-steps` lowers (or raises) the limit for this run."""
    argv = {
        "generate": [*GEN, "--output", str(tmp_path / "o.png")],
        "hunt": ["hunt", "--model", "tiny-sd3", "--prompts", "a cat", "--output-dir", str(tmp_path / "out")],
        "eval": ["eval", "--model", "tiny-sd3", "--prompts", "a cat", "--config", "c=--steps 3", "--output-dir",
                 str(tmp_path / "out")],
    }[command]  # fmt: skip
    steps = [] if command == "eval" else ["--steps", "3"]
    assert run_main([*argv, *steps, "--max-steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "over the limit max_steps=2; it is raised with --max-steps" in err
    args = (
        __import__("headpag.cli", fromlist=["build_parser"]).build_parser().parse_args([*argv, "--max-steps", "500"])
    )
    assert Limits.from_args(args).max_steps == 500 and Limits.from_args(args).max_queue == Limits().max_queue
