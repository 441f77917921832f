"""
The search run directory has one owner, `headpag/search/rundir.py`: no other module names its files, and the UI's
reader follows `SearchConfig` itself (a new field is accepted without touching the UI).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from headpag.app.search import config_from_run_dir, config_types, meta_bytes, read_run_meta
from headpag.options import Limits
from headpag.search import config as search_config
from headpag.search.config import SearchConfig
from headpag.search.rundir import RunDirectory


PACKAGE = Path(__file__).resolve().parents[1] / "headpag"
OWNER = PACKAGE / "search" / "rundir.py"
FILE_NAMES = {"journal.jsonl", "selected_heads.json", "config.json"}
ROUND_FILE = re.compile(r"round_.*(\.json|_gradients)")


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                ids.add(id(body[0].value))
    return ids


def run_directory_literals(path: Path) -> list[str]:
    """Where `path` names a run directory's files in code (path operations, not messages or docstrings)."""
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                text = None
                if isinstance(side, ast.Constant) and isinstance(side.value, str):
                    text = side.value
                elif isinstance(side, ast.JoinedStr):
                    text = "".join(v.value for v in side.values if isinstance(v, ast.Constant))
                if text is not None and (text in FILE_NAMES | {"rounds"} or ROUND_FILE.search(text)):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: / {text!r}")
        elif isinstance(node, ast.Constant) and id(node) not in docs and node.value in FILE_NAMES - {"config.json"}:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    return found


def test_no_module_but_rundir_names_the_run_directorys_files():
    search_modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p != OWNER]
    found = [hit for p in search_modules for hit in run_directory_literals(p)]
    assert found == []
    assert run_directory_literals(OWNER)  # the check sees the owner's own names (it can fail)


def test_a_new_search_config_field_is_accepted_by_the_ui(tmp_path, monkeypatch):
    """The UI's run reader derives its field table from `SearchConfig`: a run with a new field still loads."""

    @dataclasses.dataclass
    class Extended(SearchConfig):
        novelty: float | None = None

    monkeypatch.setattr(search_config, "SearchConfig", Extended)
    monkeypatch.setattr("headpag.app.search.SearchConfig", Extended)
    assert config_types()["novelty"] == (int, float, type(None))
    run = RunDirectory(tmp_path / "run")
    config = Extended(prompts=["a cat"], seeds=[1], novelty=0.5)
    run.path.mkdir()
    run.write_config({"config_hash": config.config_hash(), "config": config.to_dict()})
    assert read_run_meta(run.path, "run")["config"]["novelty"] == 0.5
    assert config_from_run_dir(run.path, "run").novelty == 0.5
    doc = json.loads(run.config_path.read_text())
    doc["config"]["novelty"] = "high"  # a value of the wrong type is still refused
    run.write_config(doc)
    with pytest.raises(ValueError, match="not a valid HeadHunter run folder"):
        read_run_meta(run.path, "run")


def test_the_ui_reads_back_every_run_it_accepts(tmp_path):
    """The largest run within the limits (every prompt at its longest, in characters JSON escapes) is readable."""
    limits = Limits(max_prompts=600, max_prompt_chars=2000, max_seeds=1000)
    config = SearchConfig(prompts=["é" * 1999 + str(i % 10) for i in range(600)], seeds=list(range(600)))
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    run.write_config({"config_hash": config.config_hash(), "config": config.to_dict()})
    assert run.config_path.stat().st_size > 1 << 20
    assert run.config_path.stat().st_size <= meta_bytes(limits)
    assert len(read_run_meta(run.path, "run", limits)["config"]["prompts"]) == 600


def test_links_planted_in_a_run_folder_are_not_followed_out_of_it(tmp_path):
    from headpag.search.journal import Journal

    outside = tmp_path / "outside"
    outside.mkdir()
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    (run.path / "rounds").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="a link leads it out of the run folder"):
        run.write_round(0, {"round": 0})
    with pytest.raises(ValueError, match="a link leads it out"):
        run.write_gradients(0, [], 2, {}, __import__("headpag.search.cost", fromlist=["Cost"]).Cost())
    (outside / "journal.jsonl").write_text("")
    run.journal_path.symlink_to(outside / "journal.jsonl")
    journal = Journal(run, "abc")
    with pytest.raises(ValueError, match="a link leads it out"):
        journal.append({"round": 0, "layer": 0, "head": 0, "score": 1.0, "scores": [1.0]})
    assert list(outside.iterdir()) == [outside / "journal.jsonl"]
    assert (outside / "journal.jsonl").read_text() == ""


def test_a_hard_link_at_the_journals_name_is_not_written(tmp_path):
    from headpag.search.journal import Journal

    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    import os

    os.link(outside, run.journal_path)
    with pytest.raises(ValueError, match="not a plain file of its own"):
        Journal(run, "abc").append({"round": 0, "layer": 0, "head": 0, "score": 1.0, "scores": [1.0]})
    assert outside.read_text() == ""
