"""Training reads its examples from the store in bounded memory, and how much it keeps changes no bit."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from loraflow.hashing import content_key
from loraflow.manifests import Examples, Latents
from loraflow.store import Store
from loraflow.training_data import StoreExamples, size_of
from tests.helpers import run, small_config


def examples(store: Store, n: int) -> Examples:
    """`n` examples whose latent `i` holds i and caption -i (keys sort in index order)."""
    latents = [store.put_tensors("latents", f"latent{i:03d}", {"latent": torch.full((4, 4), float(i))}) for i in range(n)]
    return Examples.from_rows(
        (f"{i}.png", latents[i].key, latents[i].sha256,
         store.put_tensors("embeddings", f"caption{i:03d}", {"hidden": torch.full((8,), -float(i))}), (8, 8))
        for i in range(n))


def test_items_come_back_right_within_the_budget(tmp_path):
    store = Store(str(tmp_path / "store"))
    data = StoreExamples(store, examples(store, 50), budget_bytes=10 * (64 + 32))  # room for ~10 pairs
    for batch in ([3, 7, 3, 49], list(range(0, 50, 2)), [1], [49, 0]):
        for i, (latent, caption) in zip(batch, data.__getitems__(batch)):
            assert latent["latent"][0, 0] == i and caption["hidden"][0] == -i
        assert data.cached_bytes == sum(size_of(t) for t in data.cached.values()) <= data.budget_bytes
    assert 0 < len(data.cached) <= 20
    data.close()


def test_a_tiny_data_budget_trains_the_same_weights(shapes, tmp_path, monkeypatch):
    """Evicting and re-reading examples every step gives bit-identical weights."""
    cfg = small_config(tmp_path / "roomy", shapes, train={"steps": 12, "checkpoint_every": 6})
    roomy, _ = run(cfg)
    reads = []

    class Tight(StoreExamples):
        def __init__(self, store, examples, budget_bytes):
            super().__init__(store, examples, budget_bytes=2000)  # a few examples of the tiny model

        def _keep(self, key, tensors):
            reads.append(key)
            super()._keep(key, tensors)

    monkeypatch.setattr(importlib.import_module("loraflow.training"), "StoreExamples", Tight)
    tight, _ = run(cfg.model_copy(update={"store": str(tmp_path / "tight")}))
    assert len(reads) > len(set(reads))  # objects were dropped and read again
    assert Path(tight.weights).read_bytes() == Path(roomy.weights).read_bytes()


def test_the_examples_table_keeps_content_order_identity_and_buckets(tmp_path):
    """Rows in any order give one table, in content order; its identity is that of the
    (latent, caption) pairs, whatever the names and sizes; training reads it back as refs and
    groups it by size."""
    store = Store(str(tmp_path / "store"))
    latents = [store.put_tensors("latents", f"l{i}", {"latent": torch.zeros(1)}) for i in range(6)]
    captions = [store.put_tensors("embeddings", f"c{i}", {"hidden": torch.zeros(1)}) for i in range(2)]
    rows = [(f"{i}.png", latents[i].key, latents[i].sha256, captions[i % 2], (8, 16) if i % 3 else (8, 8))
            for i in range(6)]
    table = Examples.from_rows(reversed(rows))
    assert table == Examples.from_rows(rows) and table.latents == sorted(table.latents)
    assert table.captions == captions and [table.captions[c] for c in table.caption] == [captions[i % 2] for i in range(6)]
    renamed = Examples.from_rows((f"other-{name}", key, sha, caption, (4, 4)) for name, key, sha, caption, _ in rows)
    assert renamed.identity() == table.identity() == content_key("list", [{"latent": key, "caption": cap.key}
                                                                             for _, key, _, cap, _ in rows])
    assert Examples.from_rows(rows[:5]).identity() != table.identity()

    data = StoreExamples(store, store.read_model(table.stored(store), Examples), budget_bytes=1000)
    assert [data.refs(i)[0] for i in range(6)] == latents and data.buckets() == [[0, 3], [1, 2, 4, 5]]
    data.close()
    with pytest.raises(ValueError, match="not where a latent"):
        Latents.of({"image": captions[0]})
    shard = Latents.of(dict(zip("fedcba", latents)), computed=6)
    assert shard.images == sorted("fedcba") and sorted(shard.refs(), key=lambda r: r.key) == latents
