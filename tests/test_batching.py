"""Batched encoders: an item's stored bytes never depend on its batch mates or on how many items
were missing, and the batch size is in no key.

Every forward pass has the same shape (the last batch padded with its last item), so an image or
prompt encoded alone gives the same object, byte for byte, as when encoded beside eight others.
Real flow runs on the tiny models: SD (CLIP) and SD3 (CLIP + T5).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loraflow.config import RunConfig
from loraflow.dataset import generate_shapes, load_dataset
from loraflow.models import resolve_model
from loraflow.store import Store
from tasks.encode_prompts import embedding_key
from tasks.latent_cache import latent_key
from tests.helpers import STAGES, row, run, small_config

SHARED = "red_circle_0"  # the image (and caption "a red circle") every store has
OTHERS = ["blue_square_0", "green_triangle_0", "yellow_circle_0", "red_square_0", "blue_triangle_0",
          "green_circle_0", "yellow_square_0", "red_triangle_0"]


def dataset(folder: Path, source: Path, stems: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        for ext in (".png", ".txt"):
            shutil.copy(source / f"{stem}{ext}", folder / f"{stem}{ext}")
    return folder


def config(root: Path, data: Path, family: str, **sections) -> RunConfig:
    """The tiny family's small config; flip on, so every image has a mirrored latent too, encoded
    in the same batched way. `dataset=` (a dict) adds dataset fields."""
    extra = {"flip": True, **sections.pop("dataset", {})}
    cfg = small_config(root / "store", data, family, **sections).model_dump()
    cfg["dataset"].update(extra)
    return RunConfig.model_validate(cfg)


def objects(cfg: RunConfig) -> dict[str, bytes]:
    """Every latent and embedding object the run's dataset and prompts name, by content key."""
    store, model = Store(cfg.store), resolve_model(cfg.model)
    d = cfg.dataset
    images = load_dataset(d)
    found = {}
    for image in images:
        key = latent_key(model.family, model.vae, image, d.resolution, d.center_crop, d.flip)
        found[key] = store.read(store.find("latents", key, "safetensors"))
    for prompt in {i.caption for i in images} | set(cfg.sample.prompts):
        key = embedding_key(model.family, model.text_encoder, cfg.encoder, prompt)
        found[key] = store.read(store.find("embeddings", key, "safetensors"))
    return found


@pytest.fixture(scope="module", params=["sd", "sd3"])
def stores(request, tmp_path_factory):
    """Per family: a store made from the shared image alone, and one made from it and 8 others."""
    family = request.param
    root = tmp_path_factory.mktemp(f"batching-{family}")
    generate_shapes(root / "shapes", variants=1)
    alone = config(root / "alone", dataset(root / "one", root / "shapes", [SHARED]), family)
    together = config(root / "together", dataset(root / "nine", root / "shapes", [SHARED, *OTHERS]), family)
    for cfg, latents in ((alone, 1), (together, 9)):
        report, states = run(cfg)
        assert states == {stage: "Completed" for stage in STAGES}
        assert row(report, "latents").computed == latents
    return root, family, alone, together


def test_item_alone_and_in_a_batch_give_the_same_bytes(stores):
    _, _, alone, together = stores
    one, nine = objects(alone), objects(together)
    assert len(one) == 1 + 2 and len(nine) == 9 + 9  # latents; captions (two are also the sample prompts)
    shared = set(one) & set(nine)
    assert len(shared) == 3  # the shared image's latent, "a red circle" and the sample prompt "a blue square"
    for key in shared:
        assert one[key] == nine[key], key


def test_items_added_later_give_the_same_bytes_as_a_fresh_store(stores, tmp_path):
    """How many items were missing (here 8 of 9, encoded in one padded batch) changes no byte."""
    root, family, alone, together = stores
    shutil.copytree(Path(alone.store), tmp_path / "store")
    grown = config(tmp_path, dataset(tmp_path / "data", root / "shapes", [SHARED, *OTHERS]), family)
    report, _ = run(grown)
    assert (row(report, "latents").computed, row(report, "latents").reused) == (8, 1)
    assert objects(grown) == objects(together)


def test_batch_size_is_in_no_key(stores, tmp_path):
    """A run with other batch sizes on a finished store re-runs nothing and changes no byte; on an
    empty store it makes objects under the same keys and every stage keeps its cache key."""
    _, family, _, together = stores
    sizes = {"dataset": {"encode_batch_size": 3}, "encoder": {"batch_size": 2}}
    before = objects(together)
    shutil.copytree(Path(together.store), tmp_path / "store")
    rerun = config(tmp_path, Path(together.dataset.source), family, **sizes)
    report, states = run(rerun)
    assert states == {stage: "Cached" for stage in STAGES}
    assert objects(rerun) == before

    fresh = config(tmp_path / "fresh", Path(together.dataset.source), family, **sizes)
    report, states = run(fresh)
    assert states == {stage: "Completed" for stage in STAGES}
    assert set(objects(fresh)) == set(before)
    assert [r.cache_key for r in report.tasks] == [r.cache_key for r in run(together)[0].tasks]


def test_helper_processes_and_a_thread_store_the_same_bytes(stores):
    """Images cut and latents written by two helper processes, or by a thread of the run's own
    process (`dataset.helpers: 0`, as inside a Dask worker), are the same objects, byte for byte."""
    root, family, _, together = stores
    data = Path(together.dataset.source)
    for helpers in (0, 2):
        cfg = config(root / f"helpers-{helpers}", data, family, dataset={"helpers": helpers})
        report, _ = run(cfg)
        assert row(report, "latents").computed == 9
        assert objects(cfg) == objects(together)


def test_helper_processes_die_with_a_killed_run():
    """A run killed with SIGKILL (no chance to stop its helpers) leaves no helper process behind."""
    import subprocess
    import sys
    import time

    script = ("import os, time\nfrom loraflow.batching import worker_pool\n"
              "with worker_pool(1, processes=True) as pool:\n"
              "    print(pool.submit(os.getpid).result(), flush=True)\n    time.sleep(120)\n")
    run_ = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    helper = int(run_.stdout.readline())
    assert helper != run_.pid and alive(helper)
    run_.kill()
    run_.wait()
    deadline = time.monotonic() + 30
    while alive(helper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(helper)


def alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
