"""The search journal under hostile and careless input: torn lines, invalid records, two writers, failed checks."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hunt_worker import brightness

from headpag import load_pipeline
from headpag._lock import FolderLocked as RunDirectoryLocked
from headpag.search import HeadHunter, SearchConfig, read_journal, write_report
from headpag.search.journal import Journal, scan_journal
from headpag.search.rundir import RunDirectory


SMALL = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16)
POOL = "0.0-3"  # 4 candidates in layer 0 of tiny-sd3 (4 layers x 4 heads)


def settings(**overrides) -> SearchConfig:
    return SearchConfig(
        **{**dict(prompts=["a cat"], seeds=[0], rounds=2, top_k=1, pool=POOL, batch_size=4, **SMALL), **overrides}
    )


@pytest.fixture(scope="module")
def pipe():
    p = load_pipeline("tiny-sd3")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    """A clean run: its result and its journal records."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = HeadHunter(pipe, brightness, settings(), out).run()
    return result, read_journal(out / "journal.jsonl")


@pytest.fixture
def warnings_log(caplog):
    caplog.set_level(logging.WARNING, logger="headpag")
    return caplog


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def line(**record) -> bytes:
    return (json.dumps(record) + "\n").encode()


def counting(calls: list[int]):
    def objective(images, prompts):
        calls.append(len(images))
        return brightness(images, prompts)

    return objective


# ---------------------------------------------------------------------------------------------------- journal file
def test_torn_tail_is_cut_before_the_next_append(tmp_path, warnings_log):
    journal = Journal(tmp_path, "h")
    journal.append({"round": 0, "layer": 0, "head": 0, "score": 1.0})
    good = journal.path.stat().st_size
    with open(journal.path, "ab") as f:
        f.write(b'{"round": 0, "layer": 0, "he')  # a writer killed inside its write
    assert journal.records() == [{"round": 0, "layer": 0, "head": 0, "score": 1.0, "config_hash": "h"}]
    assert any("torn last line" in m for m in messages(warnings_log))
    warnings_log.clear()
    journal.append({"round": 0, "layer": 0, "head": 1, "score": 2.0})
    assert [m for m in messages(warnings_log) if f"byte offset {good}" in m and str(journal.path) in m]
    lines = journal.path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3  # two whole lines, nothing merged
    assert [(r["head"], r["score"]) for r in journal.records()] == [(0, 1.0), (1, 2.0)]


def test_torn_tail_without_any_newline(tmp_path, warnings_log):
    journal = Journal(tmp_path, "h")
    journal.path.write_bytes(b"x" * 70000)  # longer than one backward read block
    journal.append({"round": 0, "layer": 1, "head": 2, "score": 0.5})
    assert any("byte offset 0" in m for m in messages(warnings_log))
    assert [r["layer"] for r in journal.records()] == [1]


def test_invalid_lines_are_skipped_with_one_warning_each(tmp_path, warnings_log):
    path = tmp_path / "journal.jsonl"
    ok = dict(round=0, layer=0, head=0, score=1.0, scores=[1.0], config_hash="h")
    path.write_bytes(
        line(**ok)  # 1
        + b"garbage {\n"  # 2
        + b"null\n"  # 3
        + b"[1, 2]\n"  # 4
        + line(round=0, layer=0, config_hash="h")  # 5: no head, no score
        + b'{"round": 0, "layer": 0, "head": 1, "score": NaN, "config_hash": "h"}\n'  # 6
        + b'{"round": 0, "layer": 0, "head": 2, "score": Infinity, "config_hash": "h"}\n'  # 7
        + line(**{**ok, "head": 3, "scores": [1.0, float("nan")]})  # 8
        + line(**{**ok, "head": 3, "score": "1.0"})  # 9: a string
        + line(**{**ok, "head": 3, "round": -1})  # 10
        + line(**{**ok, "head": True})  # 11: a bool is no head
        + line(**{**ok, "head": 3, "config_hash": "other"})  # 12: another run's
        + b"\xff\xfe\x00binary\n"  # 13
        + b"[" * 100000
        + b"\n"  # 14: nesting deep enough to break a recursive parser
        + b"\n"  # 15: blank, skipped silently
        + line(**{**ok, "head": 3})  # 16
    )
    records = read_journal(path, "h")
    assert [(r["head"], r["score"]) for r in records] == [(0, 1.0), (3, 1.0)]
    logged = messages(warnings_log)
    assert len(logged) == 13
    for number, why in [
        (2, "not valid JSON"),
        (3, "not a JSON object (got null)"),
        (4, "not a JSON object"),
        (5, "missing keys 'head', 'score'"),
        (6, "score must be a finite number, got nan"),
        (7, "score must be a finite number, got inf"),
        (8, "scores must be a non-empty list of finite numbers"),
        (9, "score must be a finite number"),
        (10, "round must be an int >= 0"),
        (11, "head must be an int >= 0"),
        (12, "config hash 'other' is not this run's"),
        (13, "not UTF-8"),
        (14, "not valid JSON"),
    ]:
        assert any(f"{path}:{number}" in m and why in m for m in logged), (number, why, logged)


def test_duplicates_keep_the_first_valid_record(tmp_path, warnings_log):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(
        line(round=0, layer=0, head=0, score=float("nan"), config_hash="h")  # invalid: does not count as first
        + line(round=0, layer=0, head=0, score=1.0, config_hash="h")
        + line(round=0, layer=0, head=0, score=9.0, config_hash="h")
        + line(round=1, layer=0, head=0, score=5.0, config_hash="h")  # another round: no duplicate
    )
    records = read_journal(path, "h")
    assert [(r["round"], r["score"]) for r in records] == [(0, 1.0), (1, 5.0)]
    assert any(
        f"{path}:3: duplicate of line 2" in m and "first valid record is kept" in m for m in messages(warnings_log)
    )


def test_pool_model_and_round_are_checked(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(
        line(round=0, layer=0, head=1, score=1.0)
        + line(round=0, layer=1, head=0, score=1.0)  # outside the pool
        + line(round=0, layer=0, head=4, score=1.0)  # outside the model (4 heads)
        + line(round=0, layer=9, head=0, score=1.0)  # outside the model (4 layers)
        + line(round=2, layer=0, head=2, score=1.0)  # the run has 2 rounds
        + line(round=0, layer=10**9, head=0, score=1.0)  # model size unknown: implausible
    )
    records, problems = scan_journal(path, rounds=2, pool={(0, h) for h in range(5)}, num_layers=4, num_heads=4)
    assert [(r["layer"], r["head"]) for r in records] == [(0, 1)]
    assert "outside the run's pool" in problems[0] and ":2:" in problems[0]
    assert "head 4 does not exist in the model" in problems[1]
    assert "layer 9 does not exist in the model" in problems[2]
    assert "round 2 is unknown: the run has 2 rounds" in problems[3]
    _, problems = scan_journal(path)
    assert len(problems) == 1 and "implausibly large" in problems[0]


def test_append_refuses_what_a_reader_would_skip(tmp_path):
    journal = Journal(tmp_path, "h", rounds=1, pool={(0, 0)})
    for bad in (
        {"round": 0, "layer": 0, "head": 0, "score": float("nan")},
        {"round": 0, "layer": 0, "head": 1, "score": 1.0},
        {"round": 1, "layer": 0, "head": 0, "score": 1.0},
    ):
        with pytest.raises(ValueError, match="invalid record"):
            journal.append(bad)
    assert not journal.path.exists()


# ---------------------------------------------------------------------------------------------------- resume
def damage(out: Path, config: SearchConfig, reference_records: list[dict]) -> None:
    """A run folder whose journal holds one valid record and every kind of bad line, ending in a torn line."""
    h = config.config_hash()
    first = next(r for r in reference_records if r["round"] == 0 and (r["layer"], r["head"]) == (0, 0))
    out.mkdir(parents=True)
    (out / "journal.jsonl").write_bytes(
        line(**first)
        + line(**{**first, "score": 1e6})  # a duplicate that would win round 0
        + line(round=0, layer=0, head=1, score=float("nan"), config_hash=h)
        + line(round=0, layer=1, head=0, score=1e6, config_hash=h)  # outside the pool
        + line(round=0, layer=99, head=0, score=1e6, config_hash=h)  # outside the model
        + line(round=7, layer=0, head=2, score=1e6, config_hash=h)  # unknown round
        + b"null\n{}\nnot json\n"
        + b'{"round": 0, "layer": 0, "head": 3, "sco'  # torn
    )


def test_resume_on_a_damaged_journal(pipe, reference, tmp_path, warnings_log):
    ref, ref_records = reference
    out = tmp_path / "run"
    damage(out, settings(), ref_records)
    calls: list[int] = []
    result = HeadHunter(pipe, counting(calls), settings(), out).run()
    assert result.order == ref.order
    for mine, theirs in zip(result.rounds, ref.rounds):
        assert mine["chosen"] == theirs["chosen"] and mine["scores"] == pytest.approx(theirs["scores"])
    assert sum(calls) == 3 + 3  # round 0: all but the journaled (0, 0); round 1: the 3 left
    assert any("torn last line at byte offset" in m for m in messages(warnings_log))
    pool = {(0, h) for h in range(4)}
    records, _ = scan_journal(out / "journal.jsonl", settings().config_hash(), 2, pool, 4, 4)
    assert len(records) == 4 + 3 and (out / "journal.jsonl").read_bytes().endswith(b"\n")
    assert not (out / ".lock").exists()
    # The report reads the same folder without a traceback.
    readme = (write_report(out) / "README.md").read_text()
    assert "Round 0 (complete, 4 candidates scored)" in readme and "Round 1 (complete" in readme


def test_a_tampered_round_file_is_recomputed_from_the_journal(pipe, reference, tmp_path, warnings_log):
    out = tmp_path / "run"
    first = HeadHunter(pipe, brightness, settings(), out).run()
    round_file = out / "rounds" / "round_0.json"
    doc = json.loads(round_file.read_text())
    other = next(h for h in ([0, 0], [0, 1]) if h != doc["chosen"][0])
    round_file.write_text(json.dumps({**doc, "chosen": [other], "selected": [other]}))
    (out / "rounds" / "round_1.json").write_text("{not json")
    calls: list[int] = []
    again = HeadHunter(pipe, counting(calls), settings(), out).run()
    assert again.order == first.order and calls == []
    logged = messages(warnings_log)
    assert any("not the top-k of its scores" in m for m in logged)
    assert any("round_1.json is invalid" in m for m in logged)


# ---------------------------------------------------------------------------------------------------- one writer
def test_second_writer_is_refused_while_a_run_is_in_progress(pipe, tmp_path):
    out = tmp_path / "run"
    refused: list[Exception] = []

    def objective(images, prompts):
        if not refused:
            try:
                HeadHunter(pipe, brightness, settings(), out)
            except RunDirectoryLocked as e:
                refused.append(e)
        return brightness(images, prompts)

    HeadHunter(pipe, objective, settings(), out).run()
    assert refused and str(out) in str(refused[0]) and f"pid {os.getpid()}" in str(refused[0])
    assert not (out / ".lock").exists()  # released at the end: the folder can be resumed
    HeadHunter(pipe, brightness, settings(), out).run()


def test_second_writer_is_refused_at_run(pipe, tmp_path):
    out = tmp_path / "run"
    hunter = HeadHunter(pipe, brightness, settings(), out)
    with _run_lock(out):
        with pytest.raises(RunDirectoryLocked, match=f"pid {os.getpid()}"):
            hunter.run()
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the refused run wrote nothing
    assert not out.exists() or not any(out.iterdir())


def test_lock_of_a_live_process_then_stale(pipe, tmp_path, warnings_log):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "hostname": socket.gethostname()}))
        with pytest.raises(RunDirectoryLocked, match=rf"{re.escape(str(out))}.*pid {sleeper.pid}"):
            HeadHunter(pipe, brightness, settings(), out)
    finally:
        sleeper.kill()
        sleeper.wait()
    hunter = HeadHunter(pipe, brightness, settings(), out)
    assert hunter.run().order
    assert any("taking over a stale lock" in m and f"pid {sleeper.pid}" in m for m in messages(warnings_log))
    assert not (out / ".lock").exists()


def test_stale_locks_of_this_pid_and_unreadable_locks(tmp_path):
    lock = _run_lock(tmp_path)
    # A lock left with this very pid by a previous process (containers reuse pids) but not held here: stale.
    lock.path.write_text(json.dumps({"pid": os.getpid(), "hostname": socket.gethostname(), "token": "old"}))
    with lock:
        assert json.loads(lock.path.read_text())["token"] == lock.token
        with pytest.raises(RunDirectoryLocked, match="this process"):
            _run_lock(tmp_path).acquire()
    assert not lock.path.exists()
    # An unreadable lock is being written by someone for a few seconds; older, it is stale.
    lock.path.write_text("")
    with pytest.raises(RunDirectoryLocked, match="being written"):
        _run_lock(tmp_path).acquire()
    os.utime(lock.path, (0, 0))
    _run_lock(tmp_path).acquire().release()
    # Another host's lock cannot be checked: never taken over.
    lock.path.write_text(json.dumps({"pid": 1, "hostname": socket.gethostname() + "-elsewhere"}))
    with pytest.raises(RunDirectoryLocked, match="another host"):
        _run_lock(tmp_path).acquire()


# ---------------------------------------------------------------------------------------------------- failed checks
def test_failed_checks_leave_nothing_behind(pipe, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="true_cfg_scale applies to FLUX only"):
        HeadHunter(pipe, brightness, settings(true_cfg_scale=4.0), out)
    with pytest.raises(ValueError, match="Unknown objective"):
        HeadHunter(pipe, "aesthetics", settings(), out)
    with pytest.raises(ValueError, match="out of range"):
        HeadHunter(pipe, brightness, settings(pool="9"), out)
    assert not out.exists()

    def broken(images, prompts):
        raise RuntimeError("objective crashed")

    with pytest.raises(RuntimeError, match="objective crashed"):
        HeadHunter(pipe, broken, settings(), out).run()
    assert not out.exists()  # the config.json, lock and folder of a run that journaled nothing are gone
    out.mkdir()
    with pytest.raises(RuntimeError, match="objective crashed"):
        HeadHunter(pipe, broken, settings(), out).run()
    assert out.is_dir() and not any(out.iterdir())  # a folder the user made is kept, empty
    with pytest.raises(ValueError, match="non-finite score"):
        HeadHunter(pipe, lambda i, p: [float("nan")] * len(i), settings(), out).run()
    # The corrected rerun, with other settings, is not refused.
    assert HeadHunter(pipe, brightness, settings(top_k=2, rounds=1), out).run().order


# ---------------------------------------------------------------------------------------------------- the report
def test_report_on_a_damaged_run_in_progress(reference, tmp_path, warnings_log):
    _, ref_records = reference
    out = tmp_path / "run"
    config = settings()
    damage(out, config, ref_records)
    with pytest.raises(ValueError, match="not a HeadHunter run directory"):
        write_report(out)
    (out / "config.json").write_text(json.dumps({"config_hash": config.config_hash(), "config": config.to_dict()}))
    readme = (write_report(out) / "README.md").read_text()
    assert "Round 0 (in progress, 1 candidates scored)" in readme
    assert "Round 7" not in readme and (out / "report" / "heatmap_round_0.png").exists()
    assert any("torn last line" in m for m in messages(warnings_log))
    # A half-written round file and a broken selected_heads.json are ignored, not fatal.
    (out / "rounds").mkdir()
    (out / "rounds" / "round_0.json").write_text('{"round": 0, "scores": [[0, 0, NaN]], "chosen": [[0, 0]]')
    (out / "selected_heads.json").write_text("[")
    assert "in progress" in (write_report(out) / "README.md").read_text()
    # A run that has scored nothing yet gets a report that says so.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((out / "config.json").read_text())
    assert "No candidate scored yet." in (write_report(empty) / "README.md").read_text()
    (empty / "config.json").write_text("null")
    with pytest.raises(ValueError, match="not a HeadHunter config"):
        write_report(empty)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("pag_scale", float("nan"), "pag_scale must be a finite number"),
        ("guidance_scale", float("inf"), "guidance_scale must be a finite number"),
        ("pag_identity_weight", float("nan"), r"pag_identity_weight must be in \[0, 1\]"),
        ("seeds", [-1], r"seeds must be integers in \[0, 2\*\*63\)"),
        ("height", 0, "height must be an integer >= 1"),
    ],
)
def test_search_config_refuses_non_finite_and_out_of_range_values(field, value, message):
    from headpag.search import SearchConfig

    with pytest.raises(ValueError, match=message):
        SearchConfig(prompts=["a cat"], **{field: value})


def _run_lock(folder):
    return RunDirectory(folder).lock()
