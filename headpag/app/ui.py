"""
The Gradio app: a model box and four tabs (Generate, Heads, Search, Evaluate), composed from `headpag.app.tabs`, and
its launch with the server's roots, credentials, limits and exposure checks.

Named API endpoints (everything else is UI-only and refused when called by name): `generate`, `cancel`, `search`,
`resume_search`, `cancel_search`, `evaluate`, `eval_report`, `load_model`. Their arguments carry the pipeline's names;
folders and files are named *inside* the server's roots, never by path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import gradio as gr
from diffusers.utils import logging

from ..options import Limits
from .host import ModelHost
from .roots import Roots
from .security import (
    BODY_SLACK,
    LoginThrottle,
    RequestGuard,
    UploadQuota,
    check_exposure,
    check_passwords,
    collect_auth,
)
from .tabs import evaluate as evaluate_tab
from .tabs import generate as generate_tab
from .tabs import heads as heads_tab
from .tabs import model as model_box
from .tabs import search as search_tab
from .tabs.common import CSS, AppContext


logger = logging.get_logger(__name__)

UPLOAD_CACHE_S = 3600  # how long Gradio keeps an upload (and the window of the per-client upload quota)

PUBLIC_ENDPOINTS = (
    "generate",
    "cancel",
    "search",
    "resume_search",
    "cancel_search",
    "evaluate",
    "eval_report",
    "load_model",
    "jobs",
)


def build_app(
    host: ModelHost,
    roots: Roots | None = None,
    limits: Limits | None = None,
    model_switch: bool = True,
    default_run: str = "",
    admins: Sequence[str] = (),
) -> gr.Blocks:
    r"""
    Build the app around a [`ModelHost`].

    Args:
        host ([`ModelHost`]): The model (may hold a start-up error instead).
        roots ([`Roots`], *optional*): The folders the UI may use (default: under `./headpag-ui`, with the outputs
            in `host.output_dir`).
        limits ([`~headpag.options.Limits`], *optional*): What one request may cost (default: `Limits()`).
        model_switch (`bool`): Whether clients may load another model (`--no-model-switch` sets it off).
        default_run (`str`): The search run name offered at start.
        admins (`list[str]`): User names who may list every job (`/jobs`) and cancel any search.
        trusted_proxies (`str`, defaults to `""`): Comma-separated addresses or networks of reverse proxies whose
            `X-Forwarded-For` / `Forwarded` headers name the client. By default no one's are trusted (uvicorn would
            trust 127.0.0.1's, so a local client could forge one address per request and dodge the per-client caps).

    Returns:
        `gr.Blocks`, with the [`AppContext`] as `demo.headpag`.
    """
    roots = roots or Roots.create(output_dir=host.output_dir)
    ctx = AppContext(
        host, roots, limits or Limits(), model_switch=model_switch, admins=frozenset(f"user:{a}" for a in admins)
    )

    # Gradio's cache of uploads and outputs: every 10 minutes, files older than an hour are deleted.
    with gr.Blocks(title="headpag", analytics_enabled=False, delete_cache=(600, UPLOAD_CACHE_S)) as demo:
        gr.Markdown(
            "## headpag: head-level perturbed-attention guidance\n"
            "Pick attention heads to perturb (SoftPAG `A ← (1−u)A + uI`), compare with the same seed without PAG, "
            "search heads with HeadHunter and score the results."
        )
        box = model_box.build(ctx)
        with gr.Row(equal_height=True):
            pag_heads = gr.Textbox(
                value="",
                label="Head set (used by Generate; type a spec, or click the grid in the Heads tab)",
                placeholder="e.g. 7 (whole layer), 11.15, 3.0-5; empty = the pipeline's default heads",
                elem_id="pag-heads",
                scale=4,
            )
            pag_heads_check = gr.HTML(ctx.spec_check(""), elem_id="pag-heads-check")
        pag_heads.change(ctx.spec_check, pag_heads, pag_heads_check, api_visibility="private")

        with gr.Tabs():
            gen = generate_tab.build(ctx, pag_heads)
            heads = heads_tab.build(ctx, pag_heads)
            search = search_tab.build(ctx, pag_heads, heads.grid, default_run)
            evaluate_tab.build(ctx, gen.gallery_state)
        model_box.wire(ctx, box, pag_heads, heads.grid, gen, search)

    demo.headpag = ctx
    return demo


def public_endpoints(demo: gr.Blocks) -> list[str]:
    """The API names of the handlers clients may call by name (the rest are the page's own)."""
    return sorted(
        fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public" and isinstance(fn.api_name, str)
    )


def launch(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    workdir: str | None = None,
    output_dir: str | None = None,
    search_dir: str | None = None,
    models_dir: str | None = None,
    eval_dir: str | None = None,
    auth: Sequence[str | tuple[str, str]] | None = None,
    auth_file: str | None = None,
    insecure: bool = False,
    model_switch: bool = True,
    limits: Limits | None = None,
    default_run: str = "",
    trusted_proxies: str = "",
    admins: Sequence[str] = (),
    block: bool = True,
):
    r"""
    Check the exposure, create the roots, load `model` (the app starts even when that fails, and says why) and serve
    the UI.

    Args:
        model (`str`, *optional*): Hub id, local folder or tiny model name (the operator's choice: any path).
        host (`str`, defaults to `"127.0.0.1"`), port (`int`, defaults to 7860), share (`bool`): Where to serve.
            Anything but loopback, or `share`, needs authentication unless `insecure`.
        device, dtype (`str`, *optional*): As for `headpag generate`.
        workdir (`str`, *optional*): Parent of the default roots (default `./headpag-ui`).
        output_dir, search_dir, models_dir, eval_dir (`str`, *optional*): The roots (see [`Roots`]).
        auth (`list`, *optional*): `"user:password"` strings or `(user, password)` pairs.
        auth_file (`str`, *optional*): A file of `user:password` lines. `HEADPAG_UI_AUTH` adds more.
        insecure (`bool`): Serve beyond this machine without authentication anyway.
        model_switch (`bool`): Whether clients may load another model.
        limits ([`~headpag.options.Limits`], *optional*): What one request may cost.
        default_run (`str`): The search run name offered at start.
        trusted_proxies (`str`): Reverse proxies whose forwarded-client headers are trusted (see [`build_app`]).
        admins (`list[str]`): Logged-in users who may list every job and cancel any search (must be among the
            logins).
        block (`bool`): Block the calling thread (the CLI) or return at once (tests).

    Returns:
        `(demo, url)`.

    Raises:
        `ValueError`: exposure without authentication, unreadable credentials, or overlapping roots, before anything
        is loaded or served.
    """
    from starlette.middleware import Middleware

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    limits = limits or Limits()
    given = [a if isinstance(a, str) else f"{a[0]}:{a[1]}" for a in auth or ()]
    credentials = collect_auth(given, auth_file)
    for warning in (check_passwords(credentials, insecure), check_exposure(host, share, bool(credentials), insecure)):
        if warning:
            logger.warning(warning)
    unknown = sorted(set(admins) - {user for user, _ in credentials or ()})
    if unknown:
        raise ValueError(f"--admin names users without a login: {', '.join(unknown)}; give them --auth first.")
    roots = Roots.create(workdir, output_dir, search_dir, models_dir, eval_dir)
    model_host = ModelHost(model, device=device, dtype=dtype, output_dir=str(roots.output))
    demo = build_app(model_host, roots, limits, model_switch=model_switch, default_run=default_run, admins=admins)
    demo.queue(default_concurrency_limit=1, max_size=max(64, 4 * limits.max_queue), api_open=False)
    public = public_endpoints(demo)
    max_body = int(limits.max_upload_mb * (1 << 20)) + BODY_SLACK
    os.environ["FORWARDED_ALLOW_IPS"] = trusted_proxies  # read by uvicorn's proxy-headers middleware ("": nobody)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=credentials,
        auth_message="Log in with the credentials the server's operator gave you." if credentials else None,
        prevent_thread_lock=not block,
        allowed_paths=[str(roots.output)],
        blocked_paths=[str(roots.search), str(roots.models), str(roots.eval)],
        max_file_size=int(limits.max_upload_mb * (1 << 20)),
        max_threads=max(40, limits.max_queue + 16),
        show_error=False,
        app_kwargs={
            "middleware": [
                Middleware(
                    RequestGuard,
                    public=lambda: public,
                    max_body=max_body,
                    throttle=LoginThrottle(),
                    uploads=UploadQuota(int(limits.max_uploads_mb_per_client * (1 << 20)), window=UPLOAD_CACHE_S),
                )
            ]
        },
        css=CSS,
        footer_links=["api"],
        quiet=not block,
    )
    return demo, url


__all__ = ["PUBLIC_ENDPOINTS", "build_app", "launch", "public_endpoints"]
