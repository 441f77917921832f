"""`headpag ui`: serve the web UI."""

from __future__ import annotations

import argparse

from .. import options
from ..models.catalog import DEFAULT_MODEL


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ui",
        help="Start the web UI (Gradio).",
        description="Serve the web UI. Clients name runs and folders inside the server's folders (never paths); "
        "anything but 127.0.0.1, or --share, needs --auth/--auth-file/HEADPAG_UI_AUTH (or --insecure).",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Loaded at start (default {DEFAULT_MODEL}, the trained shapes testbed shipped offline): hub id, local "
        "diffusers folder, or tiny-sd3 / tiny-sd35 / tiny-flux (offline, random weights). When it cannot be loaded "
        "the app still starts and says why.",
    )
    p.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="Also create a public gradio.live link (needs --auth).")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=options.DTYPES, default=None)

    roots = p.add_argument_group("folders (clients name what is inside them; nothing outside is read or written)")
    roots.add_argument(
        "--workdir", default="headpag-ui", help="Parent of the four folders below when they are not given."
    )
    roots.add_argument(
        "--output-dir", default=None, help="Generated PNGs and saved head sets; the only folder served to clients."
    )
    roots.add_argument("--search-dir", default=None, help="HeadHunter runs, one folder per run name.")
    roots.add_argument(
        "--models-dir",
        default=None,
        help="Models clients may load by folder name, and metric weights (CLIP configs/checkpoints, PickScore "
        "folders, Inception weights) named by file or folder name.",
    )
    roots.add_argument("--eval-dir", default=None, help="Image folders to score and `headpag eval` runs.")

    access = p.add_argument_group("access")
    access.add_argument(
        "--auth",
        action="append",
        default=[],
        metavar="USER:PASSWORD",
        help="A login (repeatable). Also: --auth-file, and HEADPAG_UI_AUTH='user:password[,user2:password2]'.",
    )
    access.add_argument("--auth-file", default=None, help="A file of 'user:password' lines ('#' comments).")
    access.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="USER",
        help="A logged-in user who may list every job (/jobs) and cancel any search (repeatable).",
    )
    access.add_argument(
        "--insecure",
        action="store_true",
        help="Serve on a non-loopback --host or with --share without authentication (refused otherwise).",
    )
    access.add_argument(
        "--no-model-switch", action="store_true", help="Clients cannot load another model (the --model stays)."
    )
    access.add_argument("--default-run", default="", help="The search run name offered at start.")
    access.add_argument(
        "--trusted-proxies",
        default="",
        help="Comma-separated reverse-proxy addresses/networks whose X-Forwarded-For names the client (default none).",
    )
    options.Limits().add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..app.ui import launch

    launch(
        args.model,
        host=args.host,
        port=args.port,
        share=args.share,
        device=args.device,
        dtype=args.dtype,
        workdir=args.workdir,
        output_dir=args.output_dir,
        search_dir=args.search_dir,
        models_dir=args.models_dir,
        eval_dir=args.eval_dir,
        auth=args.auth,
        auth_file=args.auth_file,
        insecure=args.insecure,
        model_switch=not args.no_model_switch,
        limits=options.Limits.from_args(args),
        default_run=args.default_run,
        trusted_proxies=args.trusted_proxies,
        admins=args.admin,
    )
    return 0
