"""Deleting or corrupting one artifact: that artifact, and only what depends on it, is recomputed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loraflow.dataset import generate_shapes, load_dataset
from loraflow.models import resolve_model
from loraflow.store import Store
from tasks.encode_prompts import embedding_key
from tasks.latent_cache import latent_key
from tasks.null_embedding import null_key
from tests.helpers import STAGES, row, run, small_config

C, R = "Cached", "Completed"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    generate_shapes(root / "data", variants=1)
    cfg = small_config(root / "store", root / "data")
    report, _ = run(cfg)
    return root, cfg, report


def artifact_path(kind: str, cfg, report) -> str:
    """The path, relative to the store root, of one artifact of the given kind."""
    model = resolve_model(cfg.model)
    if kind == "embedding":  # a caption that is not also a sample prompt
        key = embedding_key(model.family, model.text_encoder, cfg.encoder, "a green triangle")
        return Store.object_path("embeddings", key, "safetensors")
    if kind == "null":
        return Store.object_path("null", null_key(model.family, model.text_encoder, cfg.encoder), "safetensors")
    if kind == "latent":
        image, d = load_dataset(cfg.dataset)[0], cfg.dataset
        key = latent_key(model.family, model.vae, image, d.resolution, d.center_crop, d.flip)
        return Store.object_path("latents", key, "safetensors")
    url = report.weights if kind == "weights" else report.samples[0]
    return str(Path(url).relative_to(report.store))


# What re-runs, and how many items it computes, when one artifact of each kind is lost.
EXPECTED = {
    "embedding": {"captions": 1},
    "null": {"null": 1},
    "latent": {"latents": 1},
    "weights": {"train": 3},  # resumes from the checkpoint before the lost final weights
    "sample": {"sample": 1},
}


@pytest.mark.parametrize("damage", ["delete", "truncate", "alter"])
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_lost_artifact_is_recomputed_alone(baseline, tmp_path, kind, damage):
    root, cfg, first = baseline
    shutil.copytree(root / "store", tmp_path / "store")
    cfg = cfg.model_copy(update={"store": str(tmp_path / "store")})
    target = tmp_path / "store" / artifact_path(kind, cfg, first)
    original = target.read_bytes()
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(original[: len(original) // 2])
    else:
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))

    report, states = run(cfg)

    expected = EXPECTED[kind]
    assert states == {s: (R if s in expected else C) for s in STAGES}
    for stage, computed in expected.items():
        assert row(report, stage).computed == computed
    assert target.read_bytes() == original  # recomputed to the same bytes


def test_planted_pickle_record_is_dropped_unread(baseline, tmp_path):
    """A cache record that names the pickle serializer is deleted, never deserialized."""
    import base64
    import json
    import pickle

    root, cfg, first = baseline
    shutil.copytree(root / "store", tmp_path / "store")
    cfg = cfg.model_copy(update={"store": str(tmp_path / "store")})
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (null_row,) = [r for r in first.tasks if r.task == "null-embedding"]
    record = tmp_path / "store" / "records" / null_row.cache_key
    planted = json.loads(record.read_text())
    planted["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle", "picklelib_version": None}
    planted["result"] = base64.b64encode(pickle.dumps(Payload())).decode()
    record.write_text(json.dumps(planted))

    _, states = run(cfg)
    assert not marker.exists()
    assert states == {s: (R if s == "null" else C) for s in STAGES}
    assert json.loads(record.read_text())["metadata"]["serializer"]["type"] == "json"
