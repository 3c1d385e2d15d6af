"""Dataset, base model and store all on S3: a real S3-compatible server (moto) on loopback.

The rows of the change matrix that scheduled retraining lives on, a second machine that shares
only the bucket, and no credential anywhere it could be read back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import s3fs
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogWorker

from loraflow.builtin import builtin_path
from loraflow.config import RunConfig
from loraflow.dataset import draw_shape, generate_shapes
from tests.conftest import ENV_SECRET
from tests.helpers import STAGES, report_states, row, run, small_config

C, R = "Cached", "Completed"
OPTIONS_SECRET = "options-planted-secret-51b2e0"
BLOCK_SECRET = "block-planted-secret-c4d81e"


def expect(**changed: str) -> dict[str, str]:
    return {stage: changed.get(stage, C) for stage in STAGES}


@pytest.fixture(scope="module")
def s3(s3_endpoint, tmp_path_factory):
    """A bucket holding the generated dataset and the tiny model, and a first full run on it."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    bucket = f"lf-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    local = tmp_path_factory.mktemp("s3-upload")
    generate_shapes(local / "data", variants=1)
    fs.put(str(local / "data"), f"{bucket}/data", recursive=True)
    fs.put(str(builtin_path("tiny-sd")), f"{bucket}/models/tiny-sd", recursive=True)
    cfg = small_config(
        f"s3://{bucket}/store", f"s3://{bucket}/data", model={"source": f"s3://{bucket}/models/tiny-sd"},
        storage_options={"endpoint_url": s3_endpoint, "key": "loraflow-test-key", "secret": OPTIONS_SECRET},
    )
    report, states = run(cfg)
    assert states == expect(**{s: R for s in STAGES})
    return fs, bucket, cfg, report


def test_everything_on_s3_nothing_changed_is_all_cache_checks(s3, s3_endpoint):
    fs, bucket, cfg, _ = s3
    # This time the credentials come from a Prefect Secret block, not the config.
    Secret(value={"key": "loraflow-test-key", "secret": BLOCK_SECRET}).save("loraflow-test-s3", overwrite=True)
    cfg = cfg.model_copy(update={"storage_options": {"endpoint_url": s3_endpoint}, "storage_secret": "loraflow-test-s3"})
    report, states = run(cfg)
    assert states == expect()
    assert all(r.computed == 0 for r in report.tasks)
    assert fs.exists(f"{bucket}/store/reports/{report.flow_run_id}.json")
    assert_no_secret_leaked(report.flow_run_id, fs, bucket)
    with get_client(sync_client=True) as client:
        shown = client.read_flow_run(report.flow_run_id).parameters["cfg"]
    assert shown["storage_options"] == {"endpoint_url": "**********"}  # names shown, values never
    assert shown["storage_secret"] == "loraflow-test-s3"


def test_secret_given_in_the_config_is_masked(s3):
    """The first run had a literal secret in storage_options: the server shows it masked."""
    fs, bucket, cfg, first = s3
    assert_no_secret_leaked(first.flow_run_id, fs, bucket)
    with get_client(sync_client=True) as client:
        shown = client.read_flow_run(first.flow_run_id).parameters["cfg"]
    assert shown["storage_options"] == {"endpoint_url": "**********", "key": "**********", "secret": "**********"}


def test_second_machine_with_fresh_prefect_database_and_disk_gets_everything_cached(s3, tmp_path):
    """Another process, its own Prefect home (new embedded server and database), its own model
    cache and digest table: it shares only the bucket, and computes nothing."""
    fs, bucket, cfg, _ = s3
    (tmp_path / "run.yaml").write_text(json.dumps(cfg.model_dump()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), LORAFLOW_HOME=str(tmp_path / "loraflow"),
               HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-m", "loraflow.cli", "run", "--config", str(tmp_path / "run.yaml"),
                           "--report", str(tmp_path / "r.json")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "prefect" / "prefect.db").exists()
    assert (tmp_path / "loraflow" / "mirrors").is_dir()  # the model came from the bucket, not a local cache
    assert report_states(tmp_path / "r.json") == expect()  # every task Cached
    for secret in (OPTIONS_SECRET, ENV_SECRET):
        assert secret not in done.stdout + done.stderr


def test_scheduled_retraining_on_s3(s3, tmp_path):
    """An edited sample prompt re-samples; images added to the bucket are encoded alone, then
    training and sampling run again. (Last in this module: it changes the bucket.)"""
    fs, bucket, cfg, _ = s3
    data = cfg.model_dump()
    data["sample"]["prompts"] = ["a red circle", "a yellow circle on grass"]
    report, states = run(RunConfig.model_validate(data))
    assert states == expect(prompts=R, sample=R)
    assert row(report, "prompts").computed == 1

    draw_shape("red", "square", 2).save(tmp_path / "red_square_9.png")
    fs.put(str(tmp_path / "red_square_9.png"), f"{bucket}/data/red_square_9.png")
    fs.pipe(f"{bucket}/data/red_square_9.txt", b"a big red square\n")
    report, states = run(RunConfig.model_validate(data))
    assert states == expect(captions=R, latents=R, train=R, sample=R)
    assert (row(report, "latents").computed, row(report, "latents").reused) == (1, 12)
    assert row(report, "captions").computed == 1


def assert_no_secret_leaked(flow_run_id: str, fs, bucket: str) -> None:
    """Neither the planted secrets nor the Secret block's value are in the flow run's stored
    parameters, its logs or the run report."""
    APILogWorker.drain_all(timeout=30, at_exit=False)
    with get_client(sync_client=True) as client:
        parameters = json.dumps(client.read_flow_run(flow_run_id).parameters)
        logs = "\n".join(log.message for log in client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))
    assert "run report" in logs
    report = fs.cat(f"{bucket}/store/reports/{flow_run_id}.json").decode()
    for secret in (OPTIONS_SECRET, ENV_SECRET, BLOCK_SECRET):
        assert secret not in parameters
        assert secret not in logs
        assert secret not in report
