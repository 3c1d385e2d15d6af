"""Built-in models and datasets are built once per machine, whole, and say so in the log."""

from __future__ import annotations

import logging
import multiprocessing
import time
from pathlib import Path

from loraflow.builtin import build_once


def slow_build(folder: Path) -> None:
    folder.mkdir()
    (folder / "part1").write_text("1")
    time.sleep(1.0)  # a second process arrives while this one builds
    (folder / "part2").write_text("2")
    with open(folder.parent / "builds", "a") as f:
        f.write("x")


def build_in_process(target: str) -> None:
    made = build_once(Path(target), slow_build)
    assert sorted(p.name for p in made.iterdir()) == ["part1", "part2"]  # never a half-built folder


def test_concurrent_builds_make_one_whole_folder(tmp_path):
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=build_in_process, args=(str(tmp_path / "model"),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (tmp_path / "builds").read_text() == "x"
    assert not list(tmp_path.glob(".*.partial"))


def test_a_killed_build_is_redone_and_the_build_is_logged(tmp_path, caplog):
    (tmp_path / ".model.partial").mkdir()  # left by a build killed midway
    (tmp_path / ".model.partial" / "part1").write_text("stale")
    with caplog.at_level(logging.INFO, logger="loraflow.builtin"):
        build_once(tmp_path / "model", slow_build)
    assert (tmp_path / "model" / "part1").read_text() == "1"
    assert any("building" in r.getMessage() for r in caplog.records)
    assert any("built model in" in r.getMessage() for r in caplog.records)
