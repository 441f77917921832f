"""`headpag presets`: the ready-made head sets shipped with headpag (taken from the HeadHunter paper's figures)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    sub.add_parser("presets", help="List the ready-made head sets (use one with --pag-heads-preset NAME).")


def run(args: argparse.Namespace) -> int:
    from ..guidance.presets import list_presets

    for info in list_presets():
        print(f"{info['name']:28s} {info['family']:5s} {info['description']}  [{info['source']}]")
    return 0
