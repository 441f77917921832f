"""`headpag hunt`: filled in by the HeadHunter search."""

from __future__ import annotations


def add_hunt_parser(sub, add_model_args, add_pag_args) -> None:
    return None
