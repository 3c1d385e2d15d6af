"""Training reads its examples from the store in bounded memory, and how much it keeps changes no bit."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from loraflow.manifests import Example
from loraflow.store import Store
from loraflow.training_data import StoreExamples, size_of
from tests.helpers import run, small_config


def examples(store: Store, n: int) -> list[Example]:
    return [Example(image=f"{i}.png",
                    latent=store.put_tensors("latents", f"latent{i}", {"latent": torch.full((4, 4), float(i))}),
                    caption=store.put_tensors("embeddings", f"caption{i}", {"hidden": torch.full((8,), -float(i))}),
                    size=(8, 8))
            for i in range(n)]


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
