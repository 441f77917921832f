"""
The `headpag` command line: `generate`, `hunt` (HeadHunter search), `eval` (comparison reports), `ui` (web UI),
`presets` (ready-made head sets). Each command is a thin module over the library.

Every error ends in one line that names the bad value or file and what is allowed, with exit code 2 for a usage
error (a bad flag, value or file) and 1 for a runtime error (a failure while working); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from diffusers.utils import logging

from . import evaluate, generate, hunt, presets, ui


logger = logging.get_logger(__name__)

COMMANDS = {"generate": generate, "hunt": hunt, "eval": evaluate, "ui": ui, "presets": presets}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headpag", description="Head-level perturbed-attention guidance.")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of an error.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints one line and exits 2
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print(f"headpag {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place every failure becomes one line
        usage = isinstance(error, (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError))
        code, kind = (2, "error") if usage else (1, type(error).__name__)
        if args.debug:
            traceback.print_exc()
        message = str(error).strip() or type(error).__name__
    print(f"headpag {args.command}: {kind}: {message}", file=sys.stderr)
    if not args.debug and code == 1:
        print("(run with --debug for the traceback)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
