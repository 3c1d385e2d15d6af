"""Sharded stages: one task run per content-defined shard, lists handed over by reference, and
the same bytes whichever Prefect task runner (threads, or Dask workers) ran the shards.

States are Prefect's own task-run states, read back from the API for real flow runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraflow.config import RunConfig
from loraflow.dataset import load_dataset
from loraflow.shards import shard_bits, split
from tests.helpers import computed, run, shard_states, small_config, snapshot


def make_images(folder: Path, count: int, captions: int, seed: int = 0, start: int = 0) -> Path:
    """`count` distinct random 32 px images, captioned "picture number <i % captions>"."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(f"picture number {i % captions}\n")
    return folder


def config(store: Path, data: Path, shard_size: int = 1000, **sections) -> RunConfig:
    cfg = small_config(store, data, **sections).model_dump()
    cfg["dataset"]["shard_size"] = shard_size
    return RunConfig.model_validate(cfg)


def test_shards_are_cut_by_content():
    assert [shard_bits(n, 8) for n in (1, 8, 9, 16, 17, 48)] == [0, 0, 1, 1, 2, 3]
    digests = [f"{i:02x}" * 32 for i in range(256)]
    shards = split(digests, str, 2)
    assert [len(s) for s in shards.values()] == [64, 64, 64, 64]
    # One more item lands in exactly one shard; every other shard's list is unchanged.
    grown = split([*digests, "7f" + "00" * 31], str, 2)
    assert [index for index in shards if shards[index] != grown[index]] == [1]


def test_one_image_added_reruns_one_shard(tmp_path):
    data = make_images(tmp_path / "data", 48, captions=12)
    cfg = config(tmp_path / "store", data, shard_size=8)
    _, _ = run(cfg)
    report, _ = run(cfg)
    before = shard_states(report.flow_run_id)
    assert len(before["latents"]) == 8 and len(before["captions"]) == 2  # 48 / 8 -> 8 shards; 12 / 8 -> 2
    assert all(state == "Cached" for states in before.values() for state in states)

    make_images(tmp_path / "data", 1, captions=12, seed=1, start=48)  # caption "picture number 0": no new caption
    report, _ = run(cfg)
    after = shard_states(report.flow_run_id)
    assert sorted(after["latents"]) == ["Cached"] * 7 + ["Completed"]
    assert after["captions"] == ["Cached", "Cached"]
    assert after["train"] == ["Completed"] and after["sample"] == ["Completed"]
    done = computed([report.model_dump()])
    assert done["latents"] == 1 and done["captions"] == 0


@pytest.mark.scale
def test_task_inputs_stay_small_at_10k_images(tmp_path):
    """10,000 images: every task gets stored lists by reference, never the dataset itself."""
    data = make_images(tmp_path / "data", 10_000, captions=10)
    cfg = config(tmp_path / "store", data, train={"steps": 1, "checkpoint_every": 1}, sample={"prompts": []})
    report, states = run(cfg)
    assert set(states.values()) == {"Completed"}
    stages = shard_states(report.flow_run_id)
    assert len(stages["latents"]) == 16  # 10,000 / 1,000 per shard -> 16 shards
    assert computed([report.model_dump()])["latents"] == 10_000
    dataset_bytes = len(pickle.dumps(load_dataset(cfg.dataset)))  # held as columns: about 90 bytes an image
    for row in report.tasks:  # what a Dask or process runner would ship to a worker for each task run
        assert row.input_bytes < 8_000 < dataset_bytes / 100, (row.label, row.input_bytes)


def test_dask_workers_store_the_same_bytes_as_threads(tmp_path):
    """The shards of a 2-worker local Dask cluster (one thread each) give the bytes the default
    thread runner gives, run with one torch thread as Dask's workers are."""
    pytest.importorskip("prefect_dask")
    data = make_images(tmp_path / "data", 24, captions=6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = config(tmp_path / "threads", data, 4, runner={"workers": 1})
        run(reference)
        on_dask = config(tmp_path / "dask", data, 4, runner={"kind": "dask", "workers": 2})
        report, _ = run(on_dask)
    finally:
        torch.set_num_threads(threads)
    stages = shard_states(report.flow_run_id)
    shards = split([i.sha256 for i in load_dataset(on_dask.dataset)], str, shard_bits(24, 4))
    assert len(stages["latents"]) == len(shards) > 4  # 24 images / 4 -> 8 shards (empty ones left out)
    assert set(stages["latents"]) == {"Completed"}  # reported to the server by the Dask workers
    assert set(stages["captions"]) == {"Completed"}
    for kind in ("latents", "embeddings", "weights"):
        assert snapshot(tmp_path / "threads", f"objects/{kind}") == snapshot(tmp_path / "dask", f"objects/{kind}"), kind
