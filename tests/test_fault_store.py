"""Tampering with the store: swapped objects, objects re-made in another process, garbage records.

Nothing wrong is ever trusted: an object copied under another key (checksum file included) is a
miss and is recomputed; the same inputs give the same bytes in any process; a record that cannot
be read, whatever it holds, is dropped and the stage caches again.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
from pathlib import Path

import cloudpickle
import pytest

from loraflow.dataset import generate_shapes
from loraflow.manifests import Embeddings, Latents, NullEmbedding, Samples, Weights
from tasks.caching import MAX_RECORD_BYTES, read_manifest
from tests.helpers import STAGES, finish, row, run, session_env, small_config, snapshot, start_cli

pytestmark = pytest.mark.fault

C, R = "Cached", "Completed"
# No sample prompt is also a caption, so each prompt embedding is named by the prompts record alone.
PROMPTS = ["a red circle in the snow", "a blue square at dusk"]
MANIFESTS = {"captions": Embeddings, "prompts": Embeddings, "null": NullEmbedding, "latents": Latents,
             "train": Weights, "sample": Samples}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One untouched run, shared: each test works on a copy of its store."""
    root = tmp_path_factory.mktemp("clean")
    generate_shapes(root / "data", variants=1)
    cfg = small_config(root / "store", root / "data", sample={"prompts": PROMPTS})
    report, _ = run(cfg)
    return cfg, report


def copy_store(clean, tmp_path):
    cfg, report = clean
    shutil.copytree(cfg.store, tmp_path / "store")
    return cfg.model_copy(update={"store": str(tmp_path / "store")}), tmp_path / "store"


def objects(store) -> dict[str, str]:
    """sha256 of every object file (checksum files included), by path in the store; training
    metrics (wall-clock times in them) count by presence only."""
    return {path.removeprefix("objects/"): digest for path, digest in snapshot(Path(store), "objects").items()}


def manifest(store: Path, report, stage: str):
    """The manifest the stage's cache record holds."""
    raw = (store / "records" / row(report, stage).cache_key).read_bytes()
    return read_manifest(raw, MANIFESTS[stage])[0]


def swap(store: Path, victim: str, donor: str) -> None:
    """Copy the donor object, checksum file included, over the victim: whole, well-formed, wrong."""
    for suffix in ("", ".sha256"):
        shutil.copyfile(store / (donor + suffix), store / (victim + suffix))


def victim_and_donor(store: Path, report, kind: str) -> tuple[str, str]:
    if kind in ("latent", "caption", "prompt", "sample"):
        stage = {"latent": "latents", "caption": "captions", "prompt": "prompts", "sample": "sample"}[kind]
        first, second = manifest(store, report, stage).refs()[:2]
        return first.path, second.path
    if kind == "null":  # there is one null embedding: a caption embedding has the same form
        return manifest(store, report, "null").embedding.path, manifest(store, report, "captions").refs()[0].path
    steps = manifest(store, report, "train").steps  # weights and checkpoints of steps 3 and 6, same keys
    early, final = steps[3].path, steps[6].path
    if kind == "weights":
        return early, final
    ckpt = lambda path: path.replace("objects/weights/", "objects/checkpoints/")  # noqa: E731
    for suffix in ("", ".sha256"):  # lose the final weights, so training runs and looks for a checkpoint
        (store / (final + suffix)).unlink()
    return ckpt(early), ckpt(final)


# What re-runs, and how many items it computes, when one object of each kind is swapped.
EXPECTED = {
    "latent": {"latents": 1},
    "caption": {"captions": 1},
    "prompt": {"prompts": 1},
    "null": {"null": 1},
    "sample": {"sample": 1},
    "weights": {"train": 6},  # from step 0: step 3's weights are not step 3's, so nothing to resume
    "checkpoint": {"train": 6},  # from step 0, not from step 6's optimizer and RNG state under step 3's name
}


@pytest.mark.parametrize("kind", EXPECTED)
def test_swapped_object_is_recomputed(clean, tmp_path, kind):
    cfg, store = copy_store(clean, tmp_path)
    untouched = objects(store)
    victim, donor = victim_and_donor(store, clean[1], kind)
    swap(store, victim, donor)

    report, states = run(cfg)

    expected = EXPECTED[kind]
    assert states == {s: (R if s in expected else C) for s in STAGES}
    for stage, computed in expected.items():
        assert row(report, stage).computed == computed
    assert objects(store) == untouched  # every object, the trained weights and samples included


@pytest.mark.slow
def test_two_processes_write_the_same_bytes(clean, tmp_path):
    """Each run in its own process, with its own empty LORAFLOW_HOME (models built there) and store."""
    cfg, _ = clean
    stores = []
    for name in ("one", "two"):  # one after the other: two cores
        run_cfg = cfg.model_copy(update={"store": str(tmp_path / name / "store")})
        finish(start_cli(run_cfg, tmp_path, name, session_env(LORAFLOW_HOME=str(tmp_path / name / "home"), OMP_NUM_THREADS="1")))
        stores.append(objects(run_cfg.store))
    kinds = {path.split("/")[0] for path in stores[0]}
    assert kinds == {"embeddings", "null", "latents", "weights", "checkpoints", "samples", "lists", "metrics"}
    assert stores[0] == stores[1]


def garbage(store: Path, report) -> dict[str, bytes | None]:
    """One garbage record of each shape, each over a real record of its own stage."""
    real = (store / "records" / row(report, "train").cache_key).read_text()
    pickled = json.loads(real)  # Prefect would unpickle this one: the right manifest, the pickle serializer
    pickled["metadata"]["serializer"] = {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None}
    pickled["result"] = base64.b64encode(cloudpickle.dumps(manifest(store, report, "train"))).decode()
    return {
        "captions": random.Random(0).randbytes(4096),
        "prompts": json.dumps({"metadata": [1, 2], "result": {"a": None}}).encode(),  # JSON, not a record
        "null": b"[" * 100_000,  # json.loads raises RecursionError
        "latents": None,  # larger than any record may be: never read
        "train": json.dumps(pickled).encode(),
        "sample": real.encode(),  # a real record, of another task: a Weights manifest, not Samples
    }


def test_garbage_records_are_dropped_and_the_cache_works_again(clean, tmp_path, caplog):
    cfg, store = copy_store(clean, tmp_path)
    for stage, data in garbage(store, clean[1]).items():
        record = store / "records" / row(clean[1], stage).cache_key
        if data is None:
            with open(record, "r+b") as f:  # sparse: quick to make
                f.truncate(MAX_RECORD_BYTES + 1)
        else:
            record.write_bytes(data)

    with caplog.at_level(logging.INFO):
        _, states = run(cfg)
    assert states == {s: R for s in STAGES}  # each ran, with its lock, and stored a new record
    dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropping cache record")]
    assert len(dropped) == len(STAGES), dropped
    assert any("Finished in state Completed" in r.getMessage() for r in caplog.records)  # task logs reach caplog
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors  # e.g. Prefect's "Error encountered when computing cache key"

    _, states = run(cfg)
    assert states == {s: C for s in STAGES}
