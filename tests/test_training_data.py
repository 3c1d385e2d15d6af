"""Training reads its examples from the store in bounded memory, and how much it keeps changes no bit."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from loraflow.hashing import content_key
from loraflow.manifests import Embeddings, Examples, Latents
from loraflow.store import Store
from loraflow.training_data import StoreExamples, size_of
from tests.helpers import run, small_config


def examples(store: Store, n: int) -> Examples:
    """`n` examples whose latent `i` holds i and caption -i (keys sort in index order)."""
    latents = [store.put_tensors("latents", key(f"latent{i:03d}"), {"latent": torch.full((4, 4), float(i))})
               for i in range(n)]
    return Examples.from_rows(
        (latents[i], store.put_tensors("embeddings", key(f"caption{i:03d}"), {"hidden": torch.full((8,), -float(i))}),
         (8, 8)) for i in range(n))


def key(name: str) -> str:
    """A content key that sorts like `name` (keys are 64 hex characters)."""
    return name.encode().hex().ljust(64, "0")


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
    (latent, caption) pairs, whatever the sizes; training reads it back as refs and groups it by size."""
    store = Store(str(tmp_path / "store"))
    latents = [store.put_tensors("latents", key(f"l{i}"), {"latent": torch.zeros(1)}) for i in range(6)]
    captions = [store.put_tensors("embeddings", key(f"c{i}"), {"hidden": torch.zeros(1)}) for i in range(2)]
    rows = [(latents[i], captions[i % 2], (8, 16) if i % 3 else (8, 8)) for i in range(6)]
    table = Examples.from_rows(reversed(rows))
    assert [table.latent(i) for i in range(6)] == [Examples.from_rows(rows).latent(i) for i in range(6)] == latents
    assert [table.caption_of(i) for i in range(6)] == [captions[i % 2] for i in range(6)]
    resized = Examples.from_rows((latent, caption, (4, 4)) for latent, caption, _ in rows)
    assert resized.identity() == table.identity() == content_key("list", [{"latent": latent.key, "caption": cap.key}
                                                                            for latent, cap, _ in rows])
    assert Examples.from_rows(rows[:5]).identity() != table.identity()
    assert Examples.from_rows([rows[0], (latents[0], captions[1], (8, 8))]).identity() != \
        Examples.from_rows([rows[0], (latents[0], captions[0], (8, 8))]).identity()

    listed = table.stored(store)
    assert listed.identity == table.identity() and listed.ref.path.endswith(".safetensors")
    data = StoreExamples(store, Examples.read(store, listed), budget_bytes=1000)
    assert [data.refs(i) for i in range(6)] == [(latents[i], captions[i % 2]) for i in range(6)]
    assert [b.tolist() for b in data.buckets()] == [[0, 3], [1, 2, 4, 5]]
    data.close()
    with pytest.raises(ValueError, match="not a table of 7"):
        Examples.read(store, listed.model_copy(update={"count": 7}))


def test_latent_and_embedding_records_are_packed_columns(tmp_path):
    """A shard's record holds three strings however many images it has, and still gives each
    image's ref; a record of another shape (the lists of an earlier version) fails to parse."""
    store = Store(str(tmp_path / "store"))
    latents = [store.put_tensors("latents", key(f"l{i}"), {"latent": torch.zeros(1)}) for i in range(6)]
    images = [key(f"image{c}") for c in "fedcba"]
    with pytest.raises(ValueError, match="not where an object"):
        Latents.of({images[0]: store.put_tensors("embeddings", key("c"), {"hidden": torch.zeros(1)})})
    shard = Latents.of(dict(zip(images, latents)), computed=6)
    assert shard.images == "".join(sorted(images)) and sorted(shard.refs(), key=lambda r: r.key) == latents
    assert Latents.model_validate_json(shard.model_dump_json()) == shard
    with pytest.raises(ValueError):
        Latents.model_validate({"images": sorted(images), "latents": [r.key for r in latents],
                                "checksums": [r.sha256 for r in latents]})
    with pytest.raises(ValueError, match="checksums"):
        Latents.model_validate(shard.model_dump() | {"checksums": shard.checksums[:-1]})

    embeddings = [store.put_tensors("embeddings", key(f"e{i}"), {"hidden": torch.zeros(1)}) for i in range(2)]
    prompts = Embeddings.of({"a cat": embeddings[1], "a dog": embeddings[0]})
    assert prompts.items == {"a cat": embeddings[1], "a dog": embeddings[0]}
    # The key downstream tasks hash is that of the {prompt: ref} form: their records stay valid.
    assert content_key(prompts) == content_key({"items": {"a cat": embeddings[1], "a dog": embeddings[0]}})
