"""The artifact store: atomic, checksummed, verified on read, and usable on any fsspec filesystem."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from safetensors.torch import load, save

from loraflow.dataset import generate_shapes
from loraflow.sealed import seal, sealed_key
from loraflow.store import ArtifactMissing, Store, safetensors_metadata, tensor_bytes
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
    ref = store.put_tensors("latents", "k2", {"latent": torch.zeros(2)})
    (tmp_path / "store" / (ref.path + ".sha256")).unlink()
    assert store.find("latents", "k2", "safetensors") is None


def test_no_temporary_files_left(store, tmp_path):
    for i in range(5):
        store.put_tensors("embeddings", f"k{i}", {"x": torch.zeros(100)})
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


def test_an_object_copied_under_another_key_is_a_miss(store, tmp_path):
    """The checksum file says the bytes are whole; the key sealed inside says whose they are."""
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(png, format="PNG")
    for ext, data in [("safetensors", save({"x": torch.zeros(3)})), ("png", png.getvalue())]:
        ours, other = store.put("samples", "k-ours", data, ext), store.put("samples", "k-other", data, ext)
        for suffix in ("", ".sha256"):  # the other key's object, checksum file included
            shutil.copy(tmp_path / "store" / (other.path + suffix), tmp_path / "store" / (ours.path + suffix))
        assert store.find("samples", "k-ours", ext) is None
        swapped = ours.model_copy(update={"sha256": other.sha256})  # what the copied checksum file says
        with pytest.raises(ArtifactMissing, match="not made for key"):
            store.read(swapped)
        assert store.broken([swapped]) == [swapped]
    with pytest.raises(ValueError, match="cannot seal"):
        store.put("samples", "k", b"{}", "bin")


def test_tensor_bytes_are_safetensors_own_whatever_the_dtype():
    """Tensors numpy has a dtype for go through safetensors' numpy front end (less Python per
    latent): the file must be byte for byte what its torch front end writes."""
    for dtype in (torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool):
        tensors = {"latent": torch.randn(4, 3, 2).to(dtype), "size": torch.tensor([32, 48]),
                   "scalar": torch.tensor(1.5).to(dtype), "strided": torch.randn(4, 6).to(dtype)[:, ::2]}
        expected = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"image": "a.png"})
        assert tensor_bytes(tensors, {"image": "a.png"}) == expected, dtype
    tensors = {"latent": torch.randn(2, 2, dtype=torch.bfloat16), "size": torch.tensor([1, 2])}  # no numpy dtype
    assert tensor_bytes(tensors) == save(tensors)


def test_seal_round_trip_and_canonical_header():
    tensors = {"b": torch.arange(5.0), "a": torch.ones(3, 2, dtype=torch.bfloat16), "c": torch.tensor([1, 2])}
    one = save(tensors, metadata={"format": "pt", "step": "3", "name": "é"})
    other = save(dict(reversed(tensors.items())), metadata={"name": "é", "step": "3", "format": "pt"})
    sealed = seal(one, "safetensors", "key1")
    assert sealed == seal(other, "safetensors", "key1")  # dict order never reaches the bytes
    assert sealed_key(sealed, "safetensors") == "key1" and sealed_key(one, "safetensors") is None
    assert int.from_bytes(sealed[:8], "little") % 8 == 0 and sealed[8:9] == b"{"
    loaded = load(sealed)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert safetensors_metadata(sealed) == {"format": "pt", "step": "3", "name": "é", "loraflow.key": "key1"}
    assert seal(sealed, "safetensors", "key1") == sealed  # canonical: sealing again changes nothing

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "a red circle")
    png = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(png, format="PNG", pnginfo=info)
    sealed = seal(png.getvalue(), "png", "key2")
    assert sealed_key(sealed, "png") == "key2" and sealed_key(png.getvalue(), "png") is None
    image = Image.open(io.BytesIO(sealed))
    assert image.text == {"loraflow-key": "key2", "prompt": "a red circle"}
    assert image.tobytes() == Image.open(png).tobytes()
    for garbage in (b"", b"\x89PNG\r\n\x1a\n", sealed[:40], b"\xff" * 8 + b"{}"):
        assert sealed_key(garbage, "png") is None and sealed_key(garbage, "safetensors") is None
