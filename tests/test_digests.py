"""The digest table: what this machine wrote or verified is not read again, in batches of any
size, from any thread, and rows nobody re-verified age out."""

from __future__ import annotations

import sqlite3
import threading
import time

import torch

from loraflow.digests import Digests, digests
from loraflow.store import Store


def test_objects_written_here_are_not_read_back(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    refs = [store.put_tensors("latents", f"key{i}", {"x": torch.full((4,), float(i))}) for i in range(5)]
    reads = []
    real_read = Store.read
    monkeypatch.setattr(Store, "read", lambda self, ref: reads.append(ref.path) or real_read(self, ref))
    assert store.broken(refs) == []
    assert reads == []  # stamps entered on write
    (tmp_path / "store" / refs[0].path).write_bytes(b"rewritten")  # a new version of the file: read, and bad
    next_run = Store(str(tmp_path / "store"))  # a run lists the store once: the next one sees the change
    assert next_run.broken(refs) == [refs[0]]
    assert reads == [refs[0].path]


def test_a_set_found_intact_is_checked_again_with_one_lookup(tmp_path, monkeypatch):
    """A record's objects, once all found intact, are checked in a later run as one set stamp; an
    object rewritten since (a new version) breaks the set's stamp and is found bad, alone."""
    store = Store(str(tmp_path / "store"))
    refs = [store.put_tensors("latents", f"key{i}", {"x": torch.full((4,), float(i))}) for i in range(5)]
    assert store.broken(refs) == []
    looked_up: list[int] = []
    real_get_many = Digests.get_many
    monkeypatch.setattr(Digests, "get_many", lambda self, stamps: looked_up.append(len(stamps)) or real_get_many(self, stamps))

    next_run = Store(str(tmp_path / "store"))
    assert next_run.broken(refs) == []  # the next run: one stamp, not five
    assert looked_up == [1]
    assert "latents" not in next_run._listings  # on a local disk, from the set's own files: no listing of the kind

    (tmp_path / "store" / refs[3].path).write_bytes(b"rewritten")
    looked_up.clear()
    assert Store(str(tmp_path / "store")).broken(refs) == [refs[3]]
    assert looked_up[0] == 1 and 5 in looked_up  # the set's stamp missed: each object's own
    assert Store(str(tmp_path / "store")).broken(refs[:3]) == []  # a set without it is still fine
    (tmp_path / "store" / (refs[1].path + ".sha256")).unlink()  # its object unchanged, but no longer whole
    assert Store(str(tmp_path / "store")).broken(refs[:3]) == [refs[1]]


def test_batches_larger_than_one_query(tmp_path):
    table = Digests(tmp_path / "d.sqlite")
    pairs = [(f"stamp{i}", f"sha{i}") for i in range(1234)]
    table.put_many(pairs + [(None, "never")])
    found = table.get_many([s for s, _ in pairs] + ["unknown", None])
    assert found == dict(pairs)
    assert table.get("stamp7") == "sha7" and table.get(None) is None


def test_threads_share_one_connection(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path))
    table = digests()
    assert digests() is table

    def work(n: int) -> None:
        for i in range(50):
            table.put(f"t{n}-{i}", str(i))
            assert table.get(f"t{n}-{i}") == str(i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(table.get_many([f"t{n}-{i}" for n in range(8) for i in range(50)])) == 400


def test_rows_not_verified_for_a_month_are_pruned(tmp_path):
    path = tmp_path / "d.sqlite"
    Digests(path).put_many([("old", "a"), ("new", "b")])
    with sqlite3.connect(path) as db:
        db.execute("UPDATE digests_v2 SET verified = ? WHERE stamp = 'old'", (time.time() - 31 * 86400,))
    table = Digests(path)  # another process opening the table
    assert table.get_many(["old", "new"]) == {"new": "b"}
