"""The web UI through its API (gradio_client) against servers on free local ports with tiny models."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import torch
from conftest import write_tiny_clip_checkpoint
from PIL import Image


pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from headpag.app.host import ModelHost, ModelLock  # noqa: E402
from headpag.app.ui import PUBLIC_ENDPOINTS  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model, tmp_path, **kwargs):
    """Serve the UI on a free local port with its folders under `tmp_path` (output/, search/, models/, eval/)."""
    from headpag.app import launch

    demo, url = launch(model, port=free_port(), block=False, workdir=str(tmp_path), **kwargs)
    return demo, url


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    demo, url = serve("tiny-sd3", tmp)
    yield url, tmp
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], verbose=False)


def test_binds_to_localhost_only(server):
    assert server[0].startswith("http://127.0.0.1:")


def test_without_auth_on_loopback_every_endpoint_is_open(client):
    """Authentication off (the default, loopback only): clients call the public endpoints without logging in."""
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert endpoints == {f"/{name}" for name in PUBLIC_ENDPOINTS}


def test_generate_endpoint(client):
    pag, nopag, settings, gallery, files, seed = client.predict(
        prompt="a lighthouse at dusk", pag_heads="1.0-1, 2", seed=5, num_inference_steps=3, api_name="/generate"
    )
    pag_image, nopag_image = Image.open(pag), Image.open(nopag)
    assert pag_image.size == nopag_image.size == (64, 64)
    assert pag_image.tobytes() != nopag_image.tobytes()  # PAG changes the image
    stored = json.loads(pag_image.text["headpag"])
    assert stored["pag_heads"] == "1.0-1, 2" and stored["seed"] == 5 and stored["num_inference_steps"] == 3
    assert json.loads(nopag_image.text["headpag"])["pag_scale"] == 0.0
    assert json.loads(settings)["model"] == "tiny-sd3" and seed == 5
    assert len(files) == 2 and len(gallery) == 1


def test_img2img_through_the_api(client, tmp_path):
    from gradio_client import handle_file

    source = tmp_path / "in.png"
    Image.new("RGB", (96, 80), (200, 60, 30)).save(source)
    pag, nopag, settings, *_ = client.predict(
        prompt="a red square",
        image=handle_file(str(source)),
        strength=0.5,
        num_inference_steps=2,
        api_name="/generate",
    )
    assert Image.open(pag).size == (64, 64) and json.loads(settings)["strength"] == 0.5
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 16)).save(huge)  # a few bytes on disk, a side over 4 x max_size
    with pytest.raises(AppError, match="each side may be at most 8192"):
        client.predict(prompt="a cat", image=handle_file(str(huge)), num_inference_steps=1, api_name="/generate")


def test_generate_matches_the_pipeline(client, server):
    """The UI's image equals a direct pipeline call with the same settings."""
    from headpag import load_pipeline

    pag, *_ = client.predict(prompt="a cat", pag_heads="1", seed=3, num_inference_steps=2, api_name="/generate")
    pipe = load_pipeline("tiny-sd3")
    direct = pipe(
        "a cat",
        pag_heads="1",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=7.0,
        generator=[torch.Generator().manual_seed(3)],
    ).images[0]
    assert Image.open(pag).convert("RGB").tobytes() == direct.tobytes()


def test_generate_with_pag_reuse_matches_the_pipeline(client):
    from headpag import load_pipeline

    pag, _, settings, *_ = client.predict(
        prompt="a cat", pag_heads="1", pag_reuse=2, seed=3, num_inference_steps=4, api_name="/generate"
    )
    assert json.loads(settings)["pag_reuse"] == 2
    pipe = load_pipeline("tiny-sd3")
    direct = pipe(
        "a cat", pag_heads="1", pag_reuse=2, num_inference_steps=4, height=64, width=64, guidance_scale=7.0,
        generator=[torch.Generator().manual_seed(3)],
    ).images[0]  # fmt: skip
    assert Image.open(pag).convert("RGB").tobytes() == direct.tobytes()
    with pytest.raises(Exception, match="pag_reuse must be >= 1"):
        client.predict(prompt="a cat", pag_reuse=0, num_inference_steps=1, api_name="/generate")


def test_two_concurrent_generations(client):
    jobs = [client.submit(prompt=f"a cat {i}", seed=i, num_inference_steps=2, api_name="/generate") for i in range(2)]
    results = [job.result(timeout=120) for job in jobs]
    assert [Image.open(r[0]).size for r in results] == [(64, 64), (64, 64)]
    assert results[0][5] == 0 and results[1][5] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pag_heads": "9"}, "out of range: layer 9 does not exist; valid layers are 0-3"),
        ({"pag_heads": "1.x"}, "1.x"),
        ({"pag_heads": "1.7"}, "head 7 does not exist"),
        ({"pag_identity_weight": 1.5}, "pag_identity_weight must be <= 1, got 1.5"),
        ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer, got 2.5"),
        ({"pag_target": "nope"}, "pag_target must be one of"),
        ({"prompt": "  "}, "Write a prompt first"),
        ({"pag_interval_start": 0.8, "pag_interval_stop": 0.2}, "pag_interval"),
    ],
)
def test_bad_inputs_give_readable_errors(client, kwargs, message):
    with pytest.raises(AppError, match=message.replace("(", r"\(")) as info:
        client.predict(**{"prompt": "a cat", "num_inference_steps": 1, **kwargs}, api_name="/generate")
    assert "Traceback" not in str(info.value)


def test_app_keeps_serving_after_errors(client):
    with pytest.raises(AppError):
        client.predict(prompt="a cat", pag_heads="99", api_name="/generate")
    pag, *_ = client.predict(prompt="a cat", num_inference_steps=1, api_name="/generate")
    assert Image.open(pag).size == (64, 64)


def test_search_endpoint_and_resume(client, server):
    write_tiny_clip_checkpoint(server[1] / "models", "tiny-clip-ui")  # named inside the models folder
    run = server[1] / "search" / "run"
    kwargs = dict(
        prompts="a cat\na dog",
        seeds="0",
        rounds=2,
        top_k=1,
        pool="1-2",
        objective="clip",
        objective_arch="tiny-clip-ui.json",
        objective_model="tiny-clip-ui.safetensors",
        num_inference_steps=2,
        size=32,
        batch_size=4,
        run="run",
    )
    status, heatmap, selected = client.predict(**kwargs, api_name="/search")
    assert "done" in status and len(selected.split(",")) == 2
    assert str(server[1]) not in status  # the run is named, its server path never shown
    assert Image.open(heatmap).size[0] > 0
    journal = (run / "journal.jsonl").read_text().splitlines()
    assert len(journal) == 8 + 7  # round 0: layers 1-2 x 4 heads; round 1: the other 7
    assert json.loads((run / "selected_heads.json").read_text())["heads"]
    # resuming a finished run re-scores nothing and returns the same heads
    weights = dict(objective="clip", objective_model="tiny-clip-ui.safetensors", objective_arch="tiny-clip-ui.json")
    status, _, again = client.predict(run="run", **weights, api_name="/resume_search")
    assert again == selected and len((run / "journal.jsonl").read_text().splitlines()) == len(journal)
    with pytest.raises(AppError, match="No search run named 'nope'"):
        client.predict(run="nope", **weights, api_name="/resume_search")
    with pytest.raises(AppError, match="holds a search with other settings"):
        client.predict(**{**kwargs, "top_k": 2}, api_name="/search")


def test_evaluate_endpoint(client, server):
    from headpag.eval import ClipScore

    models, evals = server[1] / "models", server[1] / "eval"
    config, checkpoint = write_tiny_clip_checkpoint(models, "tiny-clip-ev")
    folder = evals / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 40, 200)).save(folder / f"{i}.png")
    tiny_clip = dict(metrics=["clip"], clip_model="tiny-clip-ev.json", clip_checkpoint="tiny-clip-ev.safetensors")
    table, details = client.predict(
        source="folder", folder="images", prompts="one\ntwo\nthree", **tiny_clip, api_name="/evaluate"
    )
    assert details[0]["name"] == "images" and details[0]["count"] == 3
    expected = ClipScore(str(config), checkpoint=checkpoint, device="cpu")(
        [Image.open(folder / f"{i}.png") for i in range(3)], ["one", "two", "three"]
    )
    assert details[0]["metrics"]["clip"]["mean"] == pytest.approx(sum(expected) / 3, abs=1e-5)
    with pytest.raises(AppError, match="Cannot pair the 3 images") as info:
        client.predict(source="folder", folder="images", prompts="one", **tiny_clip, api_name="/evaluate")
    assert str(server[1]) not in str(info.value)
    (folder / "more").mkdir()  # images beside a sub-folder of images: refused, none silently left out
    Image.new("RGB", (32, 32)).save(folder / "more" / "0.png")
    with pytest.raises(AppError, match="holds images beside sub-folders of images"):
        client.predict(source="folder", folder="images", prompts="one\ntwo\nthree", **tiny_clip, api_name="/evaluate")
    (folder / "more" / "0.png").unlink()
    (folder / "more").rmdir()

    fresh = Client(server[0], verbose=False)  # a new session: its gallery is empty
    with pytest.raises(AppError, match="gallery is empty"):
        fresh.predict(source="gallery", **tiny_clip, api_name="/evaluate")
    fresh.predict(prompt="a cat", seed=1, num_inference_steps=2, api_name="/generate")
    fresh.predict(prompt="a dog", seed=2, num_inference_steps=2, api_name="/generate")
    table, details = fresh.predict(source="gallery", **tiny_clip, api_name="/evaluate")
    assert [(d["name"], d["count"]) for d in details] == [("with PAG", 2), ("without PAG", 2)]


def test_eval_report_endpoint(client, server, tmp_path):
    from headpag.eval.report import write_eval_report

    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), "red").save(image)
    row = {"name": "cfg", "options": "--guidance-scale 5", "count": 1, "images": [str(image)], "prompts": ["a"]}
    run = server[1] / "eval" / "ev"
    write_eval_report(run, [{**row, "metrics": {"clip": {"mean": 20.0, "ci95": [19.0, 21.0]}}}], {})
    text, pictures = client.predict(run="ev", api_name="/eval_report")
    assert "| cfg |" in text and len(pictures) == 2  # the CLIP bar plot and one grid
    assert str(run) not in text  # the report's title names the run folder by its root, not its server path


def test_startup_failure_still_serves_and_explains(tmp_path):
    demo, url = serve(str(tmp_path / "missing-model"), tmp_path)
    assert str(tmp_path) not in demo.headpag.host.error  # clients read the folder's name, not its server path
    try:
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="Could not load .*missing-model.*tiny-sd3"):
            client.predict(prompt="a cat", api_name="/generate")
        status, *_ = client.predict(model="tiny-flux", spec="", api_name="/load_model")
        assert "tiny-flux" in status and "FLUX.1" in status and "double-stream" in status
        pag, nopag, settings, *_ = client.predict(
            prompt="a cat", pag_heads="2", true_cfg_scale=1.0, num_inference_steps=2, api_name="/generate"
        )  # the controls' defaults were set for the tiny models offered at start-up
        assert json.loads(settings)["model"] == "tiny-flux" and Image.open(pag).size == (64, 64)
        # FLUX's true CFG with the negative prompt box left empty runs against the empty prompt, as diffusers does
        _, _, settings, *_ = client.predict(
            prompt="a cat", pag_heads="2", true_cfg_scale=2.0, num_inference_steps=2, api_name="/generate"
        )
        assert (json.loads(settings)["true_cfg_scale"], json.loads(settings)["negative_prompt"]) == (2.0, "")
    finally:
        demo.close()


def test_model_lock_reports_the_holder():
    lock = ModelLock()
    waits = []
    with lock.held_by("search"):
        thread = threading.Thread(target=lambda: lock.acquire("generate", waits.append))
        thread.start()
        thread.join(0.2)
        assert waits == ["search"] and thread.is_alive()  # generate waits for the search batch
    thread.join(5)
    assert lock.holder == "generate"
    lock.release()
    assert lock.holder is None


def test_host_start_error_names_the_fix(tmp_path):
    host = ModelHost(str(tmp_path / "nope"), output_dir=str(tmp_path / "png"))
    assert host.pipe is None and "hf auth login" in host.error and "tiny-sd3" in host.error
    with pytest.raises(ValueError, match="Could not load"):
        host.require()


def test_head_grid_geometry_and_toggling():
    from headpag.app.heads_grid import CELL, LEFT, TOP, cell_at, render_grid, toggle

    image = render_grid(57, 24, {(3, 4)}, num_double_blocks=19)  # FLUX.1's grid
    assert image.size == (LEFT + 24 * CELL + 1, TOP + 57 * CELL + 1)
    assert cell_at(LEFT + 4 * CELL + 5, TOP + 3 * CELL + 5, 57, 24) == (3, 4)
    assert cell_at(LEFT - 1, TOP + 5, 57, 24) is None and cell_at(LEFT + 24 * CELL + 2, TOP, 57, 24) is None
    assert image.getpixel((LEFT + 4 * CELL + 5, TOP + 3 * CELL + 5)) != image.getpixel((LEFT + 5, TOP + 5))
    heat = render_grid(4, 4, {(0, 0)}, {(0, 0): 1.0, (0, 1): 0.0})
    assert heat.getpixel((LEFT + CELL + 5, TOP + 5)) != heat.getpixel((LEFT + 2 * CELL + 5, TOP + 5))
    assert toggle("", 1, 2, 4, 4) == "1.2" and toggle("1.2", 1, 2, 4, 4) == ""
    assert toggle("1.0-2", 1, 3, 4, 4) == "1" and toggle("1", 1, 0, 4, 4) == "1.1-3"
    with pytest.raises(ValueError, match="out of range"):
        toggle("9", 0, 0, 4, 4)


def test_cancel_stops_a_running_generation(server):
    import time

    client = Client(server[0], verbose=False)  # cancellation is per session
    png_dir = server[1] / "output"
    before = set(png_dir.glob("*.png"))
    job = client.submit(prompt="a long one", num_inference_steps=100, width=256, height=256, api_name="/generate")
    deadline = time.monotonic() + 60
    while job.status().code.name != "PROCESSING" and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    start = time.monotonic()
    client.predict(api_name="/cancel")
    with pytest.raises(Exception):  # noqa: B017 - cancelled: an AppError or the client's CancelledError
        job.result(timeout=60)
    assert time.monotonic() - start < 30  # 2 x 100 steps at 256x256 take minutes here
    assert set(png_dir.glob("*.png")) == before  # nothing half-written
    pag, *_ = client.predict(prompt="a cat", num_inference_steps=1, api_name="/generate")  # lock released
    assert Image.open(pag).size == (64, 64)


def test_heads_tab_offers_the_ready_made_head_sets(tmp_path):
    """The Heads tab's preset dropdown lists the shipped head sets; a preset of another shape is refused clearly."""
    import gradio as gr

    from headpag.app.roots import Roots
    from headpag.app.ui import build_app

    host = ModelHost("tiny-sd3", output_dir=str(tmp_path / "output"))
    demo = build_app(host, Roots.create(workdir=str(tmp_path)))
    dropdowns = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "heads-preset"]
    assert dropdowns and "sd3-blue" in [value for _, value in dropdowns[0].choices]
    (use_preset,) = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "use_preset"]
    with pytest.raises(gr.Error, match="24"):
        use_preset("sd3-blue")  # SD3-medium's 24 x 24 heads; the tiny model has 4 x 4
    with pytest.raises(gr.Error, match="Unknown"):
        use_preset("no-such-preset")


def test_search_with_a_preference_objective_and_no_weights_fails_clearly(client, server):
    """The aesthetic head is a file of the models folder; its CLIP encoder has no weights on this server: the
    search fails with the loader's message (what to supply), and no path of the server is shown."""
    head = server[1] / "models" / "head.pth"
    torch.save({"layers.0.weight": torch.zeros(1, 768), "layers.0.bias": torch.zeros(1)}, head)
    with pytest.raises(AppError, match="No weights for the CLIP model") as error:
        client.predict(
            prompts="a cat", seeds="0", rounds=1, top_k=1, pool="1.0", objective="aesthetic",
            objective_model="head.pth", num_inference_steps=1, size=32, batch_size=1, run="aesthetic-run",
            api_name="/search",
        )  # fmt: skip
    assert str(server[1]) not in str(error.value)


def test_endpoint_inputs_are_declared_by_parameter_name():
    """`by_name` returns components in the handler's order and refuses a missing or unknown name."""
    import gradio as gr

    from headpag.app.tabs.common import by_name

    def handler(prompt: str, width: int = 64, height: int = 64, request: gr.Request = None, progress=gr.Progress()):  # noqa: B008
        return prompt

    with gr.Blocks():
        prompt, width, height = gr.Textbox(), gr.Number(), gr.Number()
    assert by_name(handler, height=height, prompt=prompt, width=width) == [prompt, width, height]
    with pytest.raises(TypeError, match=r"none for \['height'\]"):
        by_name(handler, prompt=prompt, width=width)
    with pytest.raises(TypeError, match=r"unknown parameters \['hieght'\]"):
        by_name(handler, prompt=prompt, width=width, height=height, hieght=height)
