"""The dataset sensor without a deployment: what counts as a change, and when the event goes out
(to the test session's Prefect server; tests/test_trigger.py has the trigger end to end)."""

from __future__ import annotations

import os

from loraflow.config import RunConfig
from loraflow.watch import fingerprint, watch


def config(shapes, tmp_path) -> RunConfig:
    return RunConfig.model_validate({"dataset": {"source": str(shapes)}, "store": str(tmp_path / "store")})


def test_first_watch_emits_then_only_a_changed_listing_does(shapes, tmp_path):
    cfg = config(shapes, tmp_path)
    first = watch(cfg)
    assert first.emitted and first.previous is None
    assert not watch(cfg).emitted  # nothing changed

    (shapes / "red_circle_0.txt").write_text("a crimson circle\n")  # a caption edit is a change too
    changed = watch(cfg)
    assert changed.emitted and changed.previous == first.fingerprint
    assert not watch(cfg).emitted


def test_fingerprint_follows_names_and_mtimes(shapes, tmp_path):
    cfg = config(shapes, tmp_path)
    before, files = fingerprint(cfg)
    assert files == len(list(shapes.iterdir()))
    image = shapes / "blue_square_0.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    touched = fingerprint(cfg)[0]
    assert touched != before
    image.rename(shapes / "blue_square_9.png")
    assert fingerprint(cfg)[0] not in (before, touched)
