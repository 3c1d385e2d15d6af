"""The artifact store: atomic, checksummed, verified on read, and usable on any fsspec filesystem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load

from loraflow.dataset import generate_shapes
from loraflow.store import ArtifactMissing, Store
from tests.helpers import STAGES, run, small_config


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"))


def test_round_trip_and_verification(store, tmp_path):
    ref = store.put_tensors("latents", "k1", {"latent": torch.arange(6.0).reshape(2, 3)})
    assert store.find("latents", "k1", "safetensors") == ref
    assert torch.equal(store.read_tensors(ref)["latent"], torch.arange(6.0).reshape(2, 3))

    path = tmp_path / "store" / ref.path
    data = path.read_bytes()
    path.write_bytes(data[:-4])  # truncated
    assert store.find("latents", "k1", "safetensors") is None
    with pytest.raises(ArtifactMissing, match=ref.path):
        store.read(ref)
    path.write_bytes(data[:-1] + b"\x00")  # same size, altered
    assert store.find("latents", "k1", "safetensors") is None


def test_object_without_its_checksum_file_is_not_present(store, tmp_path):
    """An interrupted write (object moved into place, checksum not yet written) leaves no object."""
    ref = store.put("samples", "k2", b"png bytes", "png")
    (tmp_path / "store" / (ref.path + ".sha256")).unlink()
    assert store.find("samples", "k2", "png") is None


def test_no_temporary_files_left(store, tmp_path):
    for i in range(5):
        store.put("embeddings", f"k{i}", b"x" * 100, "safetensors")
    assert not [p for p in (tmp_path / "store").rglob("*") if ".tmp-" in p.name]


def test_bad_store_url_names_the_url():
    with pytest.raises(Exception, match="store: cannot open 'nosuch://x'"):
        Store("nosuch://x")


def test_memory_store_caches_across_runs(tmp_path):
    """Any fsspec URL is a store: records and objects both live there."""
    generate_shapes(tmp_path / "data", variants=1)
    cfg = small_config("memory://loraflow-test/store", tmp_path / "data")
    run(cfg)
    _, states = run(cfg)
    assert states == {stage: "Cached" for stage in STAGES}


def test_store_holds_no_pickles(tmp_path):
    """After a full run every file is safetensors, PNG, JSON or a checksum: nothing to unpickle."""
    generate_shapes(tmp_path / "data", variants=1)
    run(small_config(tmp_path / "store", tmp_path / "data"))
    kinds = {}
    for path in (tmp_path / "store").rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.name.endswith(".sha256"):
            kind = "checksum"
            assert len(data) == 64
        elif path.suffix == ".safetensors":
            kind = "safetensors"
            load(data)
        elif path.suffix == ".png":
            kind = "png"
            assert data.startswith(b"\x89PNG")
        else:
            kind = "json"
            json.loads(data)
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == {"checksum", "safetensors", "png", "json"}
