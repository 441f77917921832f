"""
The web UI against hostile clients, through its API (gradio_client and raw HTTP) on 127.0.0.1 with tiny models:
folders named inside the server's roots only, no file content in errors, model loading by name, authentication and
exposure, limits refused before any work (non-finite numbers included), search cancellation and queue bounds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import write_tiny_clip_checkpoint
from PIL import Image


pytest.importorskip("gradio_client")
import httpx  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from test_app import free_port, serve  # noqa: E402

from headpag.app.security import check_exposure, collect_auth, is_loopback, read_auth_file  # noqa: E402
from headpag.options import Limits  # noqa: E402


USERS = {"alice": "pw-lantern-harbor", "bob": "pw-quartz-meadow", "carol": "pw-violet-canyon"}
SECRET = "SECRET-7f3a"  # planted in files the server must never quote
LIMITS = dict(max_queue_per_client=1, max_queue=2, max_upload_mb=1.0)
SEARCH = dict(
    prompts="a cat\na dog",
    seeds="0",
    top_k=1,
    objective="clip",
    objective_arch="tiny-clip.json",
    objective_model="tiny-clip.safetensors",
    num_inference_steps=2,
    size=32,
    batch_size=1,
)
WEIGHTS = dict(objective="clip", objective_arch="tiny-clip.json", objective_model="tiny-clip.safetensors")


def _plant(tmp: Path) -> Path:
    """The server's folders with crafted content, and an outside folder with secrets and a model."""
    from headpag import load_pipeline

    outside = tmp / "outside"
    (outside / "model").mkdir(parents=True)
    (outside / "config.json").write_text(json.dumps({"config_hash": SECRET, "config": {SECRET: 1}}))
    (outside / "report.md").write_text(f"# {SECRET}\n")
    (outside / "secret.txt").write_text(SECRET)
    Image.new("RGB", (16, 16), "red").save(outside / "picture.png")
    (outside / "model" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    ui = tmp / "ui"
    search, models, evals = ui / "search", ui / "models", ui / "eval"
    for folder in (search, models, evals):
        folder.mkdir(parents=True)
    write_tiny_clip_checkpoint(models, "tiny-clip")
    load_pipeline("tiny-sd3").save_pretrained(models / "tiny-local")
    (models / "crafted-model").mkdir()
    (models / "crafted-model" / "model_index.json").write_text(json.dumps({"_class_name": f"{SECRET}Pipeline"}))
    (models / "evil-link").symlink_to(outside / "model")
    (search / "evil-link").symlink_to(outside)
    (search / "crafted").mkdir()
    (search / "crafted" / "config.json").write_text(json.dumps({"config_hash": "x", "config": {SECRET: 1}}))
    (search / "binary").mkdir()
    (search / "binary" / "config.json").write_bytes(b"\x89" + SECRET.encode())
    (search / "linked").mkdir()
    (search / "linked" / "config.json").symlink_to(outside / "config.json")
    (evals / "evil-link").symlink_to(outside)
    (evals / "binary-report").mkdir()
    (evals / "binary-report" / "report.md").write_bytes(b"\xff\xfe" + SECRET.encode())
    (evals / "linked-report").mkdir()
    (evals / "linked-report" / "report.md").symlink_to(outside / "report.md")
    (evals / "linked-images").mkdir()
    (evals / "linked-images" / "a.png").symlink_to(outside / "picture.png")
    return outside


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """A server with authentication (alice, bob, carol) and small queue and upload limits."""
    tmp = tmp_path_factory.mktemp("secure")
    outside = _plant(tmp)
    demo, url = serve("tiny-sd3", tmp / "ui", auth=list(USERS.items()), limits=Limits(**LIMITS))
    yield demo, url, tmp / "ui", outside
    demo.close()


def login(secure, user: str = "alice") -> Client:
    return Client(secure[1], auth=(user, USERS[user]), verbose=False)


@pytest.fixture(scope="module")
def alice(secure):
    return login(secure, "alice")


def http(secure, user: str | None = "alice") -> httpx.Client:
    """Raw HTTP, logged in as `user` (None: anonymous)."""
    h = httpx.Client(base_url=secure[1], timeout=120)
    if user is not None:
        assert h.post("login", data={"username": user, "password": USERS[user]}).status_code == 200
    return h


def call_raw(h: httpx.Client, name: str, body: str) -> str:
    """Call a named endpoint with a raw JSON body (so `NaN` and `Infinity` reach the server); the event stream."""
    r = h.post(f"gradio_api/call/v2/{name}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    return h.get(f"gradio_api/call/v2/{name}/{r.json()['event_id']}").text


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- auth
def test_unauthenticated_clients_are_refused(secure):
    with pytest.raises(Exception):  # noqa: B017 - the client cannot even read the app's config
        Client(secure[1], verbose=False)
    with pytest.raises(Exception):  # noqa: B017
        Client(secure[1], auth=("alice", "wrong"), verbose=False)
    anonymous = http(secure, None)
    assert anonymous.get("gradio_api/info").status_code == 401
    assert anonymous.post("gradio_api/call/v2/generate", json={"prompt": "a cat"}).status_code == 401
    assert anonymous.post("login", data={"username": "alice", "password": "nope"}).status_code == 400


def test_authenticated_client_generates(alice, secure):
    pag, nopag, *_ = alice.predict(prompt="a cat", num_inference_steps=1, api_name="/generate")
    assert Image.open(pag).size == (64, 64)
    assert http(secure).get("gradio_api/info").status_code == 200


# ---------------------------------------------------------------------------------------------------- exposure
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host):
    assert is_loopback(host) and check_exposure(host, False, authenticated=False, insecure=False) is None


@pytest.mark.parametrize(
    "host, share", [("0.0.0.0", False), ("192.168.1.7", False), ("::", False), ("127.0.0.1", True)]
)
def test_exposure_without_auth_is_refused_at_start_up(tmp_path, host, share):
    from headpag.app import launch

    with pytest.raises(ValueError, match="Refusing to start: .*no authentication is set.*--insecure"):
        launch("tiny-sd3", host=host, share=share, port=free_port(), block=False, workdir=str(tmp_path))
    assert not (tmp_path / "output").exists()  # refused before anything was created, loaded or served
    warning = check_exposure(host, share, authenticated=False, insecure=True)
    assert "--insecure" in warning  # allowed with --insecure, loudly
    assert check_exposure(host, share, authenticated=True, insecure=False) is None


def test_weak_passwords_are_refused_at_start_up(tmp_path):
    from headpag.app.security import check_passwords

    for credentials, rule in (
        ([("a", "b")], "shorter than 12 characters"),
        ([("alice", "alice-is-my-password")], "contains the user name"),
        ([("bob", "xxxxxxxxxxxxxxxx")], "one character repeated"),
    ):
        with pytest.raises(ValueError, match=f"Refusing to start: Weak password for '.*' \\({rule}\\).*--insecure"):
            serve("tiny-sd3", tmp_path / "ui", auth=credentials)
        assert "starting anyway" in check_passwords(credentials, insecure=True)
    assert check_passwords(list(USERS.items()), insecure=False) is None
    assert not (tmp_path / "ui").exists()  # refused before anything was created


def test_cli_refuses_exposure_without_auth(tmp_path, capsys, monkeypatch):
    from headpag.cli import main

    monkeypatch.delenv("HEADPAG_UI_AUTH", raising=False)
    code = main(["ui", "--model", "tiny-sd3", "--host", "0.0.0.0", "--workdir", str(tmp_path)])
    assert (
        code == 2 and "Refusing to start: --host 0.0.0.0 is reachable from other machines" in capsys.readouterr().err
    )


def test_credentials_from_flags_file_and_environment(tmp_path):
    file = tmp_path / "users"
    file.write_text("# logins\nbob:pw:with:colons\n\ncarol:pw-c\n")
    env = {"HEADPAG_UI_AUTH": "dave:pw-d, erin:pw-e"}
    pairs = collect_auth(["alice:pw-a"], file, env=env)
    assert pairs == [
        ("alice", "pw-a"),
        ("bob", "pw:with:colons"),
        ("carol", "pw-c"),
        ("dave", "pw-d"),
        ("erin", "pw-e"),
    ]
    assert collect_auth(None, None, env={}) is None
    file.write_text("alice-without-password\n")
    with pytest.raises(ValueError, match="line 1: expected 'user:password'") as info:
        read_auth_file(file)
    assert "alice-without-password" not in str(info.value)  # a credential line is never quoted


# ---------------------------------------------------------------------------------------------------- roots
ESCAPES = [
    "/etc",
    "run\n",
    "../../escape",
    "..",
    "%2e%2e%2fescape",
    "a/b",
    "a\\b",
    "evil-link",
    "",
    ".hidden",
    "x" * 65,
]


@pytest.mark.parametrize("name", ESCAPES)
def test_path_escapes_are_refused(alice, secure, name):
    ui, outside = secure[2], secure[3]
    before = tree(outside)
    calls = [
        dict(**SEARCH, rounds=1, run=name, api_name="/search"),
        dict(run=name, **WEIGHTS, api_name="/resume_search"),
        dict(run=name, api_name="/eval_report"),
        dict(source="folder", folder=name, metrics=["clip"], clip_model="tiny-clip.json", api_name="/evaluate"),
    ]
    for kwargs in calls:
        if name == "" and kwargs["api_name"] == "/search":
            continue  # an empty run name is a new, timestamped run: fine
        with pytest.raises(AppError) as info:
            alice.predict(**kwargs)
        message = str(info.value)
        assert any(s in message for s in ("Invalid", "outside", "No ", "Choose")), (kwargs["api_name"], message)
        assert str(outside) not in message and str(ui) not in message and SECRET not in message
    assert tree(outside) == before  # nothing written through a link
    assert not (ui / "escape").exists() and not (ui.parent / "escape").exists()


def test_crafted_files_are_never_quoted(alice, secure):
    for run in ("crafted", "binary"):
        with pytest.raises(AppError, match="not a valid HeadHunter run folder") as info:
            alice.predict(run=run, **WEIGHTS, api_name="/resume_search")
        assert SECRET not in str(info.value) and "0x89" not in str(info.value)
    with pytest.raises(AppError, match="outside") as info:
        alice.predict(run="linked", **WEIGHTS, api_name="/resume_search")
    assert SECRET not in str(info.value)
    with pytest.raises(AppError, match="not a valid `headpag eval` run folder") as info:
        alice.predict(run="binary-report", api_name="/eval_report")
    assert SECRET not in str(info.value) and "0xff" not in str(info.value)
    for run in ("linked-report", "evil-link"):
        with pytest.raises(AppError, match="outside") as info:
            alice.predict(run=run, api_name="/eval_report")
        assert SECRET not in str(info.value)
    with pytest.raises(AppError, match="outside"):
        alice.predict(source="folder", folder="linked-images", clip_model="tiny-clip.json", api_name="/evaluate")
    with pytest.raises(AppError, match="Unknown CLIP model") as info:
        alice.predict(source="gallery", clip_model="secret.txt", api_name="/evaluate")
    with pytest.raises(AppError, match="No CLIP weights file named"):
        alice.predict(source="gallery", clip_model="tiny-clip.json", clip_checkpoint="x.pt", api_name="/evaluate")


def test_only_outputs_are_served(alice, secure):
    ui, outside = secure[2], secure[3]
    pag, *_ = alice.predict(prompt="a cat", num_inference_steps=1, api_name="/generate")
    served = next((ui / "output").glob("*.png"))
    logged_in, anonymous = http(secure), http(secure, None)
    assert logged_in.get(f"gradio_api/file={served}").status_code == 200
    assert anonymous.get(f"gradio_api/file={served}").status_code == 401
    for path in (ui / "models" / "tiny-clip.json", ui / "search" / "crafted" / "config.json", outside / "secret.txt"):
        response = logged_in.get(f"gradio_api/file={path}")
        assert response.status_code == 403 and SECRET not in response.text


def test_upload_size_is_capped(secure):
    h = http(secure)
    big = b"0" * int(1.5 * (1 << 20))  # over max_upload_mb=1
    response = h.post("gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert response.status_code == 413


def chunked_post(url: str, path: str, megabytes: int, cookie: str = "") -> int | None:
    """POST `megabytes` of body with `Transfer-Encoding: chunked` (no Content-Length) over a raw socket; the status
    the server answered with, or `None` when it closed the connection without an answer."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = f"POST /{path} HTTP/1.1\r\nHost: {parts.hostname}\r\nTransfer-Encoding: chunked\r\n"
    head += "Content-Type: application/json\r\n" + (f"Cookie: {cookie}\r\n" if cookie else "") + "\r\n"
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"0" * (1 << 20))
    try:
        sock.sendall(head.encode())
        for _ in range(megabytes):
            sock.sendall(chunk)
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server stopped reading: fine, its answer is still there to read
    try:
        answer = sock.recv(4096).decode(errors="replace")
    except OSError:
        return None
    finally:
        sock.close()
    return int(answer.split()[1]) if answer.startswith("HTTP/") else None


def test_chunked_bodies_are_counted_as_they_stream(secure):
    """Bodies without Content-Length, anonymous and logged in, on several routes: refused past the limit (2 MB here)
    without being buffered; the server's memory stays bounded."""
    import resource

    url = secure[1]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in ("gradio_api/cancel", "gradio_api/queue/join", "gradio_api/upload", "login"):
        for _ in range(2):
            status = chunked_post(url, path, 64)  # other 4xx: answered before the body was read
            assert status is None or 400 <= status < 500, status
    assert chunked_post(url, "gradio_api/cancel", 16) == 413  # a route that reads its body: cut at the limit
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, grown_mb  # 8 x 64 MB were sent
    logged_in = http(secure)
    cookie = "; ".join(f"{k}={v}" for k, v in logged_in.cookies.items())
    assert chunked_post(url, "gradio_api/queue/join", 16, cookie) == 413
    small = logged_in.post("gradio_api/upload", files={"files": ("s.png", b"0" * 1000, "image/png")})
    assert small.status_code == 200  # within the limit, streamed uploads still work


def test_ui_only_handlers_are_not_callable_through_the_api(alice, secure):
    demo = secure[0]
    private = sorted(fn.api_name for fn in demo.fns.values() if fn.api_visibility == "private")
    assert {"redraw", "spec_check", "save_heads", "load_scores", "click_cell"} <= set(private)
    h = http(secure)
    for name in private:
        with pytest.raises(ValueError, match="Cannot find a function"):
            alice.predict("1", api_name=f"/{name}")
        for route in (f"gradio_api/call/{name}", f"gradio_api/call/v2/{name}", f"gradio_api/run/{name}"):
            assert h.post(route, json={"data": ["1"]}).status_code == 404, route


# ---------------------------------------------------------------------------------------------------- models
def test_model_switching_by_name_only(alice, secure, tmp_path, monkeypatch):
    ui, outside = secure[2], secure[3]
    try:
        status, *_ = alice.predict(model="tiny-sd35", spec="", api_name="/load_model")
        assert "Loaded:** `tiny-sd35`" in status
        status, *_ = alice.predict(model="tiny-local", spec="1", api_name="/load_model")  # a models-folder name
        assert "Loaded:** `tiny-local`" in status and str(ui) not in status
        for model in (str(outside / "model"), "../outside/model", "/etc", "evil-link", "%2e%2e%2fmodel"):
            with pytest.raises(AppError, match="not accepted|Invalid|outside|No model folder") as info:
                alice.predict(model=model, spec="", api_name="/load_model")
            assert str(outside) not in str(info.value)
        status, *_ = alice.predict(model="crafted-model", spec="", api_name="/load_model")
        assert "could not be loaded" in status and SECRET not in status and "Loaded:** `tiny-local`" in status
        status, *_ = alice.predict(model="nobody/no-such-model", spec="", api_name="/load_model")
        assert "Could not load 'nobody/no-such-model'" in status  # a hub id: tried on the hub (offline here)
        monkeypatch.chdir(tmp_path)  # a hub id that is also a relative path on the server is not loaded from disk
        (tmp_path / "owner" / "name").mkdir(parents=True)
        with pytest.raises(AppError, match="also names a path on the server"):
            alice.predict(model="owner/name", spec="", api_name="/load_model")
    finally:
        alice.predict(model="tiny-sd3", spec="", api_name="/load_model")


def test_model_switch_can_be_switched_off(tmp_path):
    demo, url = serve(None, tmp_path, model_switch=False)
    try:
        with pytest.raises(AppError, match="switched off on this server \\(--no-model-switch\\)"):
            Client(url, verbose=False).predict(model="tiny-sd3", spec="", api_name="/load_model")
        assert demo.headpag.host.pipe is None
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------------- limits
@pytest.mark.parametrize(
    "endpoint, kwargs, message",
    [
        ("/generate", {"pag_heads": "0-99999999"}, "layer 99999999 does not exist; valid layers are 0-3"),
        ("/generate", {"pag_heads": "1.0-99999999"}, "head 99999999 does not exist; valid heads are 0-3"),
        ("/generate", {"width": 20000}, "width 20000 is over the limit max_size=2048.*--max-size"),
        ("/generate", {"num_inference_steps": 10**6}, "over the limit max_steps=200.*--max-steps"),
        ("/generate", {"pag_scale": 1e6}, "over the limit max_scale=100.*--max-scale"),
        ("/generate", {"prompt": "x" * 5000}, "prompt is 5000 characters.*max_prompt_chars=2000.*--max-prompt-chars"),
        ("/generate", {"seed": 2**70}, "seed must be <= "),
        ("/search", {"seeds": "0-1000000"}, "over the limit max_seeds=1000.*--max-seeds"),
        ("/search", {"size": 20000}, "over the limit max_size=2048.*--max-size"),
        ("/search", {"pool": "0-99999999"}, "layer 99999999 does not exist"),
        ("/search", {"rounds": 10**6}, "over the limit max_rounds=64.*--max-rounds"),
        ("/search", {"batch_size": 10**5}, "over the limit max_images=8.*--max-images"),
        ("/search", {"prompts": "a\n" * 1001}, "over the limit max_prompts=1000.*--max-prompts"),
        ("/search", {"seeds": "0-99", "prompts": "a\n" * 11}, "pairs 1100 is over the limit max_pairs=1000"),
        ("/search", {"num_inference_steps": 10**6}, "over the limit max_steps=200"),
    ],
)
def test_huge_requests_are_refused_at_once(alice, secure, endpoint, kwargs, message):
    base = {"prompt": "a cat", "num_inference_steps": 1} if endpoint == "/generate" else {**SEARCH, "run": "huge"}
    start = time.monotonic()
    with pytest.raises(AppError, match=message):
        alice.predict(**{**base, **kwargs}, api_name=endpoint)
    assert time.monotonic() - start < 10
    assert not (secure[2] / "search" / "huge").exists()  # nothing written


@pytest.mark.parametrize(
    "endpoint, body, message",
    [
        ("generate", '{"prompt": "a cat", "pag_scale": NaN}', "pag_scale must be a finite number"),
        ("generate", '{"prompt": "a cat", "guidance_scale": Infinity}', "guidance_scale must be a finite number"),
        ("generate", '{"prompt": "a cat", "seed": -Infinity}', "seed must be a finite integer"),
        ("generate", '{"prompt": "a cat", "width": NaN}', "width must be a finite integer"),
        ("generate", '{"prompt": "a cat", "pag_interval_stop": NaN}', "pag_interval_stop must be a finite number"),
        ("search", '{"prompts": "a cat", "pag_scale": Infinity, "run": "nan"}', "pag_scale must be a finite number"),
        ("search", '{"prompts": "a cat", "size": NaN, "run": "nan"}', "height must be a finite integer"),
        ("search", '{"prompts": "a cat", "rounds": "3", "run": "nan"}', "rounds must be an integer"),
    ],
)
def test_non_finite_numbers_are_refused(secure, endpoint, body, message):
    stream = call_raw(http(secure), endpoint, body)
    assert "event: error" in stream and message in stream, stream
    assert not (secure[2] / "search" / "nan").exists()


# ---------------------------------------------------------------------------------------------------- cancel
def _journal(run: Path) -> list[str]:
    path = run / "journal.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_cancel_a_running_search(alice, secure):
    run = secure[2] / "search" / "cancel-me"
    job = alice.submit(**SEARCH, rounds=2, run="cancel-me", api_name="/search")  # 16 + 15 candidates, 62 batches
    deadline = time.monotonic() + 120
    while not _journal(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _journal(run), "the search never journaled a candidate"
    with pytest.raises(AppError, match=r"started by another client; only that client \(or an admin\) can cancel it"):
        login(secure, "bob").predict(api_name="/cancel_search")
    start = time.monotonic()
    assert "Cancelling search run 'cancel-me'" in alice.predict(api_name="/cancel_search")
    status, _, _ = job.result(timeout=60)
    assert "cancelled" in status and time.monotonic() - start < 30
    kept = _journal(run)
    assert 0 < len(kept) < 31
    records = [json.loads(line) for line in kept]  # every line a whole record
    assert all({"round", "layer", "head", "score"} <= set(r) for r in records)
    assert json.loads((run / "config.json").read_text())["config_hash"]
    time.sleep(1.0)
    assert _journal(run) == kept  # stopped: nothing more is written
    with pytest.raises(AppError, match="No search is running"):
        alice.predict(api_name="/cancel_search")
    status, _, selected = alice.predict(run="cancel-me", **WEIGHTS, api_name="/resume_search")
    assert "done" in status and len(selected.split(",")) == 2
    final = _journal(run)
    assert final[: len(kept)] == kept and len(final) == 31  # resumed: the cancelled run's candidates were kept


# ---------------------------------------------------------------------------------------------------- queue
def test_queue_bounds_per_client_and_in_total(secure):
    ctx = secure[0].headpag
    admission = ctx.admission
    clients = {user: login(secure, user) for user in USERS}
    wait = dict(prompt="waits for the model", num_inference_steps=2, api_name="/generate")
    deadline = time.monotonic() + 60
    jobs = []
    ctx.host.lock.acquire("test")  # the model is busy: admitted generations wait for it
    try:
        jobs.append(clients["alice"].submit(**wait))
        while admission.count("user:alice") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(AppError, match="max_queue_per_client=1.*--max-queue-per-client"):
            clients["alice"].predict(prompt="another", num_inference_steps=1, api_name="/generate")
        jobs.append(clients["bob"].submit(**wait))  # another client: admitted, it waits for the model
        while admission.count("user:bob") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert admission.total == 2
        with pytest.raises(AppError, match="server is busy.*max_queue=2.*--max-queue"):
            clients["carol"].predict(prompt="a third", num_inference_steps=1, api_name="/generate")
        assert time.monotonic() - start < 10  # refused at once, not after a wait
        for user in ("alice", "bob"):
            clients[user].predict(api_name="/cancel")
    finally:
        ctx.host.lock.release()
    for job in jobs:
        with pytest.raises(Exception):  # noqa: B017 - cancelled while waiting
            job.result(timeout=120)
    while admission.total and time.monotonic() < deadline + 60:
        time.sleep(0.05)
    assert admission.total == 0  # every ticket released
    pag, *_ = clients["carol"].predict(prompt="now there is room", num_inference_steps=1, api_name="/generate")
    assert Image.open(pag).size == (64, 64)


def test_an_image_is_decoded_only_after_the_client_is_admitted(secure, tmp_path, monkeypatch):
    """A client over its queue cap gets refused before its upload is decoded (a small file whose header says
    4096x4096 costs 50 MB once decoded)."""
    from gradio_client import handle_file

    import headpag.app.tabs.generate as generate_tab

    decoded = []
    original = generate_tab.decode_image
    monkeypatch.setattr(generate_tab, "decode_image", lambda path: decoded.append(path) or original(path))
    big = tmp_path / "big.png"
    image = Image.new("RGB", (4096, 4096))  # 50 MB decoded; some noise keeps it under the decompression-ratio cap
    image.paste(Image.fromarray(__import__("numpy").random.default_rng(0).integers(0, 256, (320, 320, 3), "uint8")))
    image.save(big, optimize=True)
    assert 200_000 < big.stat().st_size < 1_000_000
    flat = tmp_path / "flat.png"
    Image.new("RGB", (4096, 4096)).save(flat, optimize=True)  # a few kB that decode to 50 MB: refused from its header
    with pytest.raises(AppError, match="would decode to .* times its file size"):
        login(secure, "bob").predict(prompt="a cat", image=handle_file(str(flat)), api_name="/generate")
    ctx = secure[0].headpag
    alice = login(secure, "alice")
    ctx.host.lock.acquire("test")
    deadline = time.monotonic() + 60
    try:
        job = alice.submit(prompt="waits for the model", num_inference_steps=2, api_name="/generate")
        while ctx.admission.count("user:alice") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(AppError, match="max_queue_per_client=1"):
            alice.predict(prompt="a cat", image=handle_file(str(big)), num_inference_steps=1, api_name="/generate")
        assert [p for p in decoded if p is not None] == []  # refused from the header and the queue cap alone
        alice.predict(api_name="/cancel")
    finally:
        ctx.host.lock.release()
    with pytest.raises(Exception):  # noqa: B017 - cancelled while waiting
        job.result(timeout=120)


def test_page_handlers_are_bounded_too(secure):
    """The page calls its own handlers by index (that cannot be refused), so they are harmless: a huge spec costs as
    much as its text."""
    handlers = {fn.name: fn.fn for fn in secure[0].fns.values()}
    start = time.monotonic()
    assert "layer 99999999 does not exist" in handlers["spec_check"]("0-99999999")
    assert handlers["redraw"]("0-99999999, 1.0-99999999", None) is not None  # the grid, with nothing selected
    assert "max_prompt_chars" in handlers["spec_check"]("0," * 5000)
    assert time.monotonic() - start < 5


def test_ui_flags(tmp_path):
    from headpag.cli import build_parser

    args = build_parser().parse_args(
        ["ui", "--max-size", "512", "--max-queue", "3", "--auth", "a:b", "--auth", "c:d", "--no-model-switch"]
    )
    limits = Limits.from_args(args)
    assert limits.max_size == 512 and limits.max_queue == 3 and limits.max_steps == Limits().max_steps
    assert args.auth == ["a:b", "c:d"] and args.no_model_switch and args.workdir == "headpag-ui"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ui", "--max-size", "nan"])


def test_a_locked_run_is_reported_without_the_owners_pid_or_host():
    import os
    import socket

    from headpag._lock import FolderLocked as RunDirectoryLocked
    from headpag.app.roots import Roots
    from headpag.app.tabs.common import AppContext

    error = RunDirectoryLocked(f"run is in use: pid {os.getpid()} on {socket.gethostname()} holds /srv/x/.lock")
    context = AppContext.__new__(AppContext)
    context.roots = Roots.__new__(Roots)
    text = context.message(error)
    assert str(os.getpid()) not in text and socket.gethostname() not in text and "/srv" not in text
    assert "in use by another search" in text


def test_forged_forwarded_headers_do_not_make_new_clients(tmp_path):
    """Without --trusted-proxies, X-Forwarded-For from 127.0.0.1 is ignored: one client stays one client."""
    demo, url = serve("tiny-sd3", tmp_path / "ui", limits=Limits(max_queue_per_client=1, max_queue=4))
    ctx = demo.headpag
    try:
        forged = [Client(url, headers={"X-Forwarded-For": f"10.0.0.{i}"}, verbose=False) for i in (1, 2)]
        ctx.host.lock.acquire("test")
        deadline = time.monotonic() + 60
        try:
            job = forged[0].submit(prompt="waits", num_inference_steps=1, api_name="/generate")
            while ctx.admission.total < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ctx.admission.count("ip:127.0.0.1") == 1
            with pytest.raises(AppError, match="max_queue_per_client=1"):
                forged[1].predict(prompt="another address?", num_inference_steps=1, api_name="/generate")
            forged[0].predict(api_name="/cancel")
        finally:
            ctx.host.lock.release()
        with pytest.raises(Exception):  # noqa: B017 - cancelled while waiting
            job.result(timeout=120)
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------------- login throttling
def test_login_throttle_backs_off_per_user_and_address():
    from headpag.app.security import LoginThrottle

    now = [0.0]
    throttle = LoginThrottle(free=3, base_delay=1.0, max_delay=8.0, window=100.0, max_keys=50, clock=lambda: now[0])
    keys = ["user:alice", "ip:1.2.3.4"]
    for _ in range(3):
        assert throttle.retry_after(keys) == 0
        throttle.failed(keys)
    assert throttle.retry_after(keys) == 1.0  # 3 free failures, then 1 s, 2 s, 4 s, ... at most 8 s
    assert throttle.retry_after(["user:bob", "ip:1.2.3.4"]) == 1.0  # the address waits for every user
    assert throttle.retry_after(["user:alice", "ip:5.6.7.8"]) == 1.0  # and the user from every address
    assert throttle.retry_after(["user:bob", "ip:5.6.7.8"]) == 0
    for _ in range(5):
        throttle.failed(keys)
    assert throttle.retry_after(keys) == 8.0
    now[0] = 7.5
    assert throttle.retry_after(keys) == pytest.approx(0.5)
    throttle.succeeded(keys)
    assert throttle.retry_after(keys) == 0
    for i in range(200):  # invented names cannot grow the table past max_keys
        throttle.failed([f"user:u{i}"])
    assert len(throttle._failures) == 50
    throttle.failed(keys)
    now[0] = 200.0  # failures older than the window are forgotten
    assert throttle.retry_after(keys) == 0


def test_wrong_passwords_are_answered_429_with_retry_after(tmp_path):
    demo, url = serve("tiny-sd3", tmp_path / "ui", auth=list(USERS.items()))
    try:
        h = httpx.Client(base_url=url, timeout=60)
        codes = [h.post("login", data={"username": "alice", "password": f"wrong-{i}"}).status_code for i in range(5)]
        assert codes == [400] * 5
        refused = h.post("login", data={"username": "alice", "password": USERS["alice"]})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "Too many failed logins" in refused.json()["detail"]
        assert h.post("login", data={"username": "bob", "password": USERS["bob"]}).status_code == 429  # same address
        time.sleep(float(refused.headers["retry-after"]) + 0.2)
        assert h.post("login", data={"username": "alice", "password": USERS["alice"]}).status_code == 200
        assert h.post("login", data={"username": "alice", "password": "wrong"}).status_code == 400  # counts anew
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------------- disk
def test_output_store_quotas_and_cleanup(tmp_path):
    from headpag.app.storage import MB, OutputStore

    now = [1_000_000.0]
    limits = Limits(max_output_mb_per_client=1.0, max_output_mb=2.5, max_output_age_h=1.0, max_output_files=5)
    store = OutputStore(tmp_path, limits, clock=lambda: now[0])

    def write(name: str, size: int, client: str, age_s: float = 0.0):
        with store.reserve(client, size) as saved:
            path = tmp_path / name
            path.write_bytes(b"x" * size)
            os.utime(path, (now[0] - age_s, now[0] - age_s))
            saved(path)

    write("a1", int(0.6 * MB), "ip:a", age_s=30)
    quota = r"your files .* take 0\.6 MB.*max_output_mb_per_client=1 MB.*--max-output-mb-per-client"
    with pytest.raises(ValueError, match=quota):
        with store.reserve("ip:a", int(0.5 * MB)):
            pass
    with store.reserve("ip:b", int(0.6 * MB)):  # a reservation holds its space while its request works
        with pytest.raises(ValueError, match="your files .* take 0\\.6 MB"):
            with store.reserve("ip:b", int(0.5 * MB)):
                pass
    write("b1", int(0.9 * MB), "ip:b", age_s=20)  # another client has its own quota
    write("c1", int(0.9 * MB), "ip:c", age_s=10)
    with pytest.raises(ValueError, match=r"the output folder take 2\.4 MB.*max_output_mb=2\.5 MB"):
        with store.reserve("ip:d", int(0.2 * MB)):
            pass
    assert store.usage() == int(0.6 * MB) + 2 * int(0.9 * MB)
    with pytest.raises(RuntimeError):  # a request that fails after writing: its file is still charged
        with store.reserve("ip:c", 10) as saved:
            (tmp_path / "c2").write_bytes(b"x" * 10)
            os.utime(tmp_path / "c2", (now[0] - 5, now[0] - 5))
            saved(tmp_path / "c2")
            raise RuntimeError("cancelled")
    assert store.usage("ip:c") == int(0.9 * MB) + 10
    now[0] += 3600 - 25  # a1 (30 s old at write) is now over an hour old, b1 not: removed by the next check
    write("d0", 10, "ip:d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b1", "c1", "c2", "d0"] and store.usage("ip:a") == 0
    for i in range(1, 4):  # beyond max_output_files the oldest files of the biggest holder go first
        write(f"d{i}", 10, "ip:d", age_s=-i)
    store.cleanup()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b1", "c1", "c2", "d2", "d3"]


def test_generation_over_the_disk_quota_is_refused_before_any_work(tmp_path):
    demo, url = serve("tiny-sd3", tmp_path / "ui", limits=Limits(max_output_mb_per_client=0.1))
    try:
        with pytest.raises(AppError, match="Disk quota: .*max_output_mb_per_client=0.1 MB"):
            Client(url, verbose=False).predict(prompt="a cat", num_inference_steps=1, api_name="/generate")
        assert list((tmp_path / "ui" / "output").glob("*.png")) == []
    finally:
        demo.close()


def test_uploads_are_bounded_per_client_per_hour(tmp_path):
    demo, url = serve("tiny-sd3", tmp_path / "ui", limits=Limits(max_uploads_mb_per_client=1.0, max_upload_mb=1.0))
    try:
        h = httpx.Client(base_url=url, timeout=60)
        blob = os.urandom(600 * 1024)
        first = h.post("gradio_api/upload", files={"files": ("a.bin", blob)})
        assert first.status_code == 200
        second = h.post("gradio_api/upload", files={"files": ("b.bin", blob)})
        assert second.status_code == 429 and "Upload quota" in second.json()["detail"]
        assert h.post("gradio_api/upload", files={"files": ("c.bin", b"x")}).status_code == 429
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------------- time
def test_search_budget_is_projected_from_the_strategy_and_refused_before_work():
    from headpag.app.search import check_search
    from headpag.search.config import SearchConfig
    from headpag.search.strategies import projected_work

    pairs = dict(prompts=[f"p{i}" for i in range(10)], seeds=[0], top_k=2, num_inference_steps=4)
    assert projected_work(SearchConfig(**pairs), 15) == (150, 600)  # every candidate on every pair
    halving = 15 * 1 + 5 * 2 + 2 * 6 + 2 * 1
    assert projected_work(SearchConfig(**pairs, strategy="halving"), 15) == (halving, 4 * halving)
    proxy = SearchConfig(**pairs, strategy="halving", proxy_steps=2)  # early stages at 2 steps, the last anew at 4
    assert projected_work(proxy, 15) == (15 + 5 * 2 + 2 * 6 + 2 * 10, 2 * (15 + 10 + 12) + 4 * 20)
    gradient = SearchConfig(**pairs, strategy="gradient", grad_steps=3)  # 3 x 10 renders of 3 steps, halving over 8
    exact = 8 * 1 + 3 * 2 + 2 * 6 + 2 * 1
    assert projected_work(gradient, 15) == (30 + exact, 30 * 3 + 4 * exact)
    assert projected_work(SearchConfig(**pairs, rounds=3), 15)[0] == 150 + 130 + 110
    values = dict(prompts=["a cat"], seeds=[0], num_inference_steps=8)
    check_search(values, 4, 4, Limits(max_search_image_steps=128))  # 16 heads x 1 pair x 8 steps
    with pytest.raises(ValueError, match=r"16 images, 128 denoising steps.*max_search_image_steps=127.*--max-search"):
        check_search(values, 4, 4, Limits(max_search_image_steps=127))
    with pytest.raises(ValueError, match="grad_steps"):  # the other fidelities' steps are bounded too
        check_search({**values, "strategy": "gradient", "grad_steps": 10**6}, 4, 4, Limits())
    with pytest.raises(ValueError, match="proxy_size"):
        check_search({**values, "strategy": "halving", "proxy_size": 65536}, 4, 4, Limits())


def test_hunt_refuses_a_search_over_its_budget(tmp_path, capsys):
    from headpag.cli import main

    out = tmp_path / "run"
    argv = ["hunt", "--model", "tiny-sd3", "--prompts", "a cat", "--steps", "2", "--output-dir", str(out)]
    assert main([*argv, "--max-search-image-steps", "10", "--no-progress"]) == 2
    assert "over the limit max_search_image_steps=10" in capsys.readouterr().err and not out.exists()


class _Job:
    """Stands in for a running SearchJob in the handlers (`summary`, `cancel`, `stop`)."""

    running, owner, name = True, "user:alice", "long-run"

    def __init__(self):
        self.cancelled, self.reason = False, None

    def summary(self):
        return {"run": self.name, "owner": self.owner, "status": "running"}

    def cancel(self):
        self.cancelled = True

    def stop(self, reason):
        self.reason = reason
        self.cancel()


def test_admins_list_jobs_and_cancel_any_search(tmp_path):
    from types import SimpleNamespace

    import gradio as gr

    from headpag.app.host import ModelHost
    from headpag.app.roots import Roots
    from headpag.app.ui import build_app

    demo = build_app(ModelHost(None), Roots.create(workdir=str(tmp_path)), admins=["carol"])
    handlers = {fn.name: fn.fn for fn in demo.fns.values()}
    as_user = lambda name: SimpleNamespace(username=name, client=None)  # noqa: E731
    job = _Job()
    demo.headpag.jobs["current"] = job
    with demo.headpag.admission.enter("user:bob", "generation"):
        listed = handlers["jobs"](request=as_user("carol"))
    assert listed == {"search": job.summary(), "requests": {"user:bob": 1}}
    with pytest.raises(gr.Error, match="Only an admin"):
        handlers["jobs"](request=as_user("alice"))
    with pytest.raises(gr.Error, match="only that client \\(or an admin\\) can cancel it"):
        handlers["cancel_search"](request=as_user("bob"))
    assert not job.cancelled
    handlers["cancel_search"](request=as_user("carol"))
    assert job.cancelled and job.reason == "cancelled by the admin carol"
    with pytest.raises(ValueError, match="--admin names users without a login: dave"):
        __import__("headpag.app.ui", fromlist=["launch"]).launch(
            None, workdir=str(tmp_path / "x"), auth=["alice:pw-lantern-harbor"], admins=["dave"], block=False
        )


def test_a_search_stops_at_its_time_limit_and_when_nobody_follows_it(tmp_path, monkeypatch):
    import threading

    from headpag.app.host import ModelLock
    from headpag.app.search import SearchCancelled, SearchJob, _CancellableHold

    class Running(SearchJob):
        running = True

    job = Running.__new__(Running)  # the watch and time logic only (no model, no thread)
    job.name, job.reason, job.status, job.watchers, job._left = "r", None, "running", 0, 0
    job.cancelled, job._watch_lock, job.grace_s, job.deadline = threading.Event(), threading.Lock(), 0.3, None
    job.watched()
    job.watched()
    job.unwatched()  # someone still follows: nothing happens
    time.sleep(0.4)
    assert not job.cancelled.is_set()
    job.unwatched()  # the last follower left (a timer starts) ...
    job.watched()  # ... came back ...
    time.sleep(0.2)
    job.unwatched()  # ... and left again: only this departure's timer counts
    time.sleep(0.2)  # the first timer has fired by now, and did nothing
    assert not job.cancelled.is_set()
    time.sleep(0.4)
    assert job.cancelled.is_set() and "nobody followed it for" in job.reason
    late = Running.__new__(Running)
    late.name, late.reason, late.status, late.cancelled = "t", None, "running", threading.Event()
    late.deadline = time.monotonic() - 1
    with pytest.raises(SearchCancelled):
        with _CancellableHold(ModelLock(), late.cancelled, late):
            pass
    assert "max_search_hours" in late.reason
