"""A training run killed from outside resumes from its latest checkpoint and ends where an
uninterrupted run ends, bit for bit on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.settings import PREFECT_API_URL
from safetensors.torch import load_file

from loraflow.dataset import generate_shapes
from tests.helpers import row, run, small_config

STEPS, EVERY = 300, 20


def checkpoints_stored(store: Path) -> int:
    return len(list((store / "objects" / "checkpoints").glob("*/*.safetensors.sha256")))


def flow_run_logs(flow_run_id: str) -> list[str]:
    """Log lines the run sent to the Prefect server (they arrive in batches, so poll briefly)."""
    messages: list[str] = []
    for _ in range(50):
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        messages = [log.message for log in logs]
        if any("run report" in m for m in messages):
            break
        time.sleep(0.2)
    return messages


def test_killed_run_resumes_from_latest_checkpoint(tmp_path):
    generate_shapes(tmp_path / "data", variants=1)
    train = {"steps": STEPS, "checkpoint_every": EVERY}
    cfg = small_config(tmp_path / "store", tmp_path / "data", train=train)
    (tmp_path / "run.yaml").write_text(json.dumps(cfg.model_dump()))

    # Start a run in its own process against the test server, and kill it once two checkpoints exist.
    # A short lease: the killed run's train lock lapses in seconds, not the default minute.
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), LORAFLOW_LOCK_LEASE_SECONDS="2")
    proc = subprocess.Popen([sys.executable, "-m", "loraflow.cli", "run", "--config", str(tmp_path / "run.yaml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while checkpoints_stored(tmp_path / "store") < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoints_stored(tmp_path / "store")
    assert 2 <= killed_at < STEPS // EVERY, "the run must be killed in the middle of training"

    report, states = run(cfg)
    assert states["train"] == "Completed"
    resumed_from = row(report, "train").reused
    assert resumed_from >= 2 * EVERY and resumed_from % EVERY == 0
    assert f"resuming from step {resumed_from}" in "\n".join(flow_run_logs(report.flow_run_id))

    uninterrupted, _ = run(small_config(tmp_path / "store-2", tmp_path / "data", train=train))
    resumed, fresh = load_file(report.weights), load_file(uninterrupted.weights)
    assert resumed.keys() == fresh.keys()
    for name in resumed:
        assert (resumed[name] == fresh[name]).all(), name
