"""`headpag ui`: serve the web UI."""

from __future__ import annotations

import argparse

from .. import options


def add_parser(sub) -> None:
    p = sub.add_parser("ui", help="Start the web UI (Gradio).")
    p.add_argument(
        "--model",
        default="stabilityai/stable-diffusion-3-medium-diffusers",
        help="Loaded at start: hub id, local diffusers folder, or tiny-sd3 / tiny-sd35 / tiny-flux (offline, random "
        "weights). When it cannot be loaded the app still starts and says why.",
    )
    p.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="Also create a public gradio.live link.")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=options.DTYPES, default=None)
    p.add_argument("--output-dir", default=None, help="Where generated PNGs go (default: a temporary folder).")
    p.add_argument("--search-dir", default="runs/ui-search", help="Default run directory of the Search tab.")


def run(args: argparse.Namespace) -> int:
    from ..app.ui import launch

    launch(
        args.model,
        host=args.host,
        port=args.port,
        share=args.share,
        device=args.device,
        dtype=args.dtype,
        output_dir=args.output_dir,
        search_dir=args.search_dir,
    )
    return 0
