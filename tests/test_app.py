"""The web UI through its API (gradio_client) against servers on free local ports with tiny models."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import torch
from conftest import write_tiny_clip_config
from PIL import Image
from safetensors.torch import save_file


pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from headpag.app.host import ModelHost, ModelLock  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model, tmp_path):
    from headpag.app import launch

    demo, url = launch(
        model, port=free_port(), block=False, output_dir=str(tmp_path / "png"), search_dir=str(tmp_path / "search")
    )
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
        ({"pag_identity_weight": 1.5}, "1.5 is greater than maximum value 1"),
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


def test_search_endpoint_and_resume(client, server, tmp_path):
    config = write_tiny_clip_config(tmp_path / "tiny-clip-ui.json")
    run = tmp_path / "run"
    kwargs = dict(
        prompts="a cat\na dog",
        seeds="0",
        rounds=2,
        top_k=1,
        pool="1-2",
        objective="clip",
        objective_arch=str(config),
        num_inference_steps=2,
        size=32,
        batch_size=4,
        output_dir=str(run),
    )
    status, heatmap, selected = client.predict(**kwargs, api_name="/search")
    assert "done" in status and len(selected.split(",")) == 2
    assert Image.open(heatmap).size[0] > 0
    journal = (run / "journal.jsonl").read_text().splitlines()
    assert len(journal) == 8 + 7  # round 0: layers 1-2 x 4 heads; round 1: the other 7
    assert json.loads((run / "selected_heads.json").read_text())["heads"]
    # resuming a finished run re-scores nothing and returns the same heads
    status, _, again = client.predict(
        output_dir=str(run),
        objective="clip",
        objective_model="",
        objective_arch=str(config),
        api_name="/resume_search",
    )
    assert again == selected and len((run / "journal.jsonl").read_text().splitlines()) == len(journal)
    with pytest.raises(AppError, match="not a HeadHunter run directory"):
        client.predict(
            output_dir=str(tmp_path / "nope"),
            objective="clip",
            objective_model="",
            objective_arch=str(config),
            api_name="/resume_search",
        )


def test_evaluate_endpoint(client, server, tmp_path):
    from headpag.eval import ClipScore

    config = write_tiny_clip_config(tmp_path / "tiny-clip-ev.json")
    torch.manual_seed(0)
    save_file(ClipScore(str(config), device="cpu").model.state_dict(), tmp_path / "clip.safetensors")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 40, 200)).save(folder / f"{i}.png")
    table, details = client.predict(
        source="folder",
        folder=str(folder),
        prompts="one\ntwo\nthree",
        metrics=["clip"],
        clip_model=str(config),
        clip_checkpoint=str(tmp_path / "clip.safetensors"),
        api_name="/evaluate",
    )
    assert details[0]["name"] == "images" and details[0]["count"] == 3
    expected = ClipScore(str(config), checkpoint=tmp_path / "clip.safetensors", device="cpu")(
        [Image.open(folder / f"{i}.png") for i in range(3)], ["one", "two", "three"]
    )
    assert details[0]["metrics"]["clip"]["mean"] == pytest.approx(sum(expected) / 3, abs=1e-5)
    with pytest.raises(AppError, match="Cannot pair the 3 images"):
        client.predict(source="folder", folder=str(folder), prompts="one", metrics=["clip"], api_name="/evaluate")

    fresh = Client(server[0], verbose=False)  # a new session: its gallery is empty
    tiny_clip = dict(metrics=["clip"], clip_model=str(config), clip_checkpoint=str(tmp_path / "clip.safetensors"))
    with pytest.raises(AppError, match="gallery is empty"):
        fresh.predict(source="gallery", **tiny_clip, api_name="/evaluate")
    fresh.predict(prompt="a cat", seed=1, num_inference_steps=2, api_name="/generate")
    fresh.predict(prompt="a dog", seed=2, num_inference_steps=2, api_name="/generate")
    table, details = fresh.predict(source="gallery", **tiny_clip, api_name="/evaluate")
    assert [(d["name"], d["count"]) for d in details] == [("with PAG", 2), ("without PAG", 2)]


def test_eval_report_endpoint(client, tmp_path):
    from headpag.eval.report import write_eval_report

    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), "red").save(image)
    row = {"name": "cfg", "options": "--guidance-scale 5", "count": 1, "images": [str(image)]}
    write_eval_report(tmp_path / "ev", [{**row, "metrics": {"clip": {"mean": 20.0, "ci95": [19.0, 21.0]}}}], {})
    text, pictures = client.predict(run_dir=str(tmp_path / "ev"), api_name="/eval_report")
    assert "| cfg |" in text and len(pictures) == 2  # the CLIP bar plot and one grid


def test_startup_failure_still_serves_and_explains(tmp_path):
    demo, url = serve(str(tmp_path / "missing-model"), tmp_path)
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
    png_dir = server[1] / "png"
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
