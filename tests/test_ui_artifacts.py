"""What a run shows in the Prefect UI, read back from Prefect's API as the UI reads it: the
artifacts (progress, stage table, weights link, loss curve, sample grid, with pictures that are
real PNGs behind their URLs, local and on S3), task tags by stage, and retries of a transient
store error."""

from __future__ import annotations

import base64
import errno
import io
import json
import re
import urllib.request

import pytest
import s3fs
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from loraflow.builtin import builtin_path
from loraflow.dataset import generate_shapes
from loraflow.store import Store, StoreError
from tasks.options import is_transient
from tests.helpers import final_task_runs, run, small_config

CELL = 160


def artifacts(flow_run_id: str) -> dict[str, object]:
    """{key: latest artifact} of the flow run (its tasks' artifacts included)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    latest = {}
    for a in sorted(found, key=lambda a: a.created):
        latest[a.key] = a
    return latest


def png_behind(artifact) -> Image.Image:
    """The PNG a browser would show for an image or markdown artifact."""
    if artifact.type == "image":
        with urllib.request.urlopen(artifact.data, timeout=30) as response:
            data = response.read()
    else:
        assert artifact.type == "markdown"
        data = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", artifact.data).group(1))
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()  # the whole file decodes
    return image


def test_a_run_shows_progress_stages_weights_loss_and_samples(shapes, tmp_path):
    cfg = small_config(tmp_path / "store", shapes, train={"steps": 6, "checkpoint_every": 3, "log_every": 1},
                       sample={"checkpoints": [3]}, runner={"tags": True})
    report, states = run(cfg)
    found = artifacts(report.flow_run_id)
    assert {"loraflow-train-progress", "loraflow-stages", "loraflow-weights", "loraflow-loss-curve",
            "loraflow-samples", "loraflow-run-report"} <= set(found)

    progress = found["loraflow-train-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0

    table = found["loraflow-stages"]
    assert table.type == "table"
    rows = json.loads(table.data)
    assert [(r["task"], r["state"], r["computed"], r["reused"]) for r in rows] == \
        [(label, state, computed, reused) for label, state, computed, reused, _, _ in report.stages()]

    weights = found["loraflow-weights"]
    assert weights.type == "markdown" and f"(file://{report.weights})" in weights.data  # Prefect's link artifact

    loss = png_behind(found["loraflow-loss-curve"])  # a local store: embedded in the markdown
    assert loss.size == (640, 320)
    grid = png_behind(found["loraflow-samples"])
    prompts, steps = len(cfg.sample.prompts), len({s.step for s in report.sample_images})
    assert steps == 2 and grid.size == (CELL * steps, (CELL + 28) * prompts)
    # The grid's cells are the samples themselves, scaled: the top-left one is the first prompt's first step.
    first = next(s for s in report.sample_images if s.prompt == cfg.sample.prompts[0] and s.step == 3 and s.index == 0)
    cell = grid.crop((0, 0, CELL, CELL)).resize((cfg.dataset.resolution,) * 2, Image.Resampling.NEAREST)
    assert list(cell.getdata()) == list(Image.open(first.url).convert("RGB").getdata())

    # With runner.tags, task runs are tagged by stage (a tag concurrency limit or a UI filter can pick a stage).
    for task_run in final_task_runs(report.flow_run_id):
        stage = task_run.name.split("[")[0]
        assert {"loraflow", f"stage:{stage}"} <= set(task_run.tags), task_run.name

    # A second run, untagged (the default: no concurrency-slot call per task run), reuses everything:
    # train is Cached, so no progress artifact; the pictures are redrawn.
    again, states = run(cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"tags": False})}))
    assert not any(task_run.tags for task_run in final_task_runs(again.flow_run_id))
    assert states["train"] == "Cached"
    found = artifacts(again.flow_run_id)
    assert "loraflow-train-progress" not in found and "loraflow-loss-curve" in found


def test_on_s3_the_pictures_are_presigned_urls_to_pngs(s3_endpoint, tmp_path):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    bucket = "lf-ui-artifacts"
    fs.mkdir(bucket)
    generate_shapes(tmp_path / "data", variants=1)
    fs.put(str(tmp_path / "data"), f"{bucket}/data", recursive=True)
    fs.put(str(builtin_path("tiny-sd")), f"{bucket}/models/tiny-sd", recursive=True)
    cfg = small_config(f"s3://{bucket}/store", f"s3://{bucket}/data", model={"source": f"s3://{bucket}/models/tiny-sd"},
                       storage_options={"endpoint_url": s3_endpoint})
    report, _ = run(cfg)
    found = artifacts(report.flow_run_id)
    for key in ("loraflow-loss-curve", "loraflow-samples"):
        assert found[key].type == "image" and found[key].data.startswith(s3_endpoint)
        assert "Signature=" in found[key].data  # presigned: the bucket itself is private
        png_behind(found[key])
    link = re.search(r"\]\((http[^)]+)\)", found["loraflow-weights"].data).group(1)
    with urllib.request.urlopen(link, timeout=30) as response:  # the link downloads them
        assert response.read() == fs.cat_file(report.weights.removeprefix("s3://"))


def test_a_transient_store_error_is_retried_and_the_run_completes(shapes, tmp_path, monkeypatch):
    cfg = small_config(tmp_path / "store", shapes)
    put_json, failed = Store.put_json, []

    def flaky(self, kind, key, value):
        if kind == "metrics" and not failed:  # the end of training: its checkpoints are stored
            failed.append(key)
            raise StoreError("store: cannot write metrics") from ConnectionResetError(errno.ECONNRESET, "reset by peer")
        return put_json(self, kind, key, value)

    monkeypatch.setattr(Store, "put_json", flaky)
    report, states = run(cfg)
    assert failed and states["train"] == "Completed"
    train = next(t for t in final_task_runs(report.flow_run_id) if t.name == "train")
    with get_client(sync_client=True) as client:
        history = [s.name for s in client.read_task_run_states(train.id)]
    assert "Retrying" in history and history[-1] == "Completed", history
    assert next(r for r in report.tasks if r.task == "train").reused == cfg.train.steps  # the retry resumed


@pytest.mark.parametrize("error,transient", [
    (StoreError("store: cannot write x: No space left on device"), False),
    (ValueError("dataset: bad caption"), False),
    (TimeoutError(), True),
    (OSError(errno.ECONNRESET, "reset"), True),
    (OSError(errno.ENOSPC, "full"), False),
])
def test_which_errors_are_transient(error, transient):
    if isinstance(error, StoreError) and not transient:
        error.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_transient(error) is transient
