"""Event-triggered retraining end to end: a real `prefect server start` (its triggers and actions
services on), the deployments from deployments/prefect.yaml, `loraflow watch` in a process of its
own emitting `loraflow.dataset.changed`, the on-demand deployment's automation creating the run,
and a real `prefect worker` running it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

from loraflow.dataset import draw_shape
from loraflow.report import Report
from tests.helpers import computed, stage_of
from tests.test_deployment import PREFECT_YAML, REPO, api, prefect, server, states  # noqa: F401 (`server` is a fixture)

pytestmark = pytest.mark.slow  # about 3 minutes on 2 cores: a server, three worker runs


def test_dataset_change_triggers_one_run_that_encodes_only_the_new_image(server, shapes, tmp_path):
    store = tmp_path / "store"
    config = tmp_path / "watch.yaml"  # the watch's own fields; the run keeps prefect.yaml's for the rest
    config.write_text(yaml.safe_dump({"dataset": {"source": str(shapes)}, "store": str(store),
                                      "train": {"steps": 6, "checkpoint_every": 3}, "sample": {"steps": 2}}))
    images = len(list(shapes.glob("*.png")))

    # First watch: never seen, so the event goes out and the automation starts a run that trains it all.
    assert "emitted" in watch(server, config)
    first = triggered_run(server, seen=set())
    prefect(server, "worker", "start", "--pool", "loraflow", "--run-once")
    assert states(server, first)[0] == "Completed"
    report = read_report(store, first)
    assert computed([report])["latents"] == images
    assert len(report["samples"]) == 3  # the deployment's prompts: the run merged prefect.yaml's config

    # Nothing changed: no event, no run.
    assert "unchanged" in watch(server, config)
    time.sleep(5)  # an automation reacts within a second or two
    assert flow_runs(server) == {first}

    # One new image and its caption: one event, one run, one latent computed, the rest reused.
    draw_shape("red", "circle", 7).save(shapes / "red_circle_new.png")
    (shapes / "red_circle_new.txt").write_text("a red circle\n")
    assert "emitted" in watch(server, config)
    second = triggered_run(server, seen={first})
    prefect(server, "worker", "start", "--pool", "loraflow", "--run-once")
    flow_state, tasks = states(server, second)
    assert flow_state == "Completed"
    assert tasks["latents"] == "Completed" and tasks["captions"] == "Cached"
    report = read_report(store, second)
    assert computed([report])["latents"] == 1
    assert sum(t.reused for t in Report.model_validate(report).tasks if stage_of(t.label) == "latents") == images


def test_dataset_watch_deployment_emits_and_the_trigger_starts_on_demand(server, shapes, tmp_path):
    before = flow_runs(server)
    params = {"cfg": {"dataset": {"source": str(shapes)}, "store": str(tmp_path / "store")}}
    out = prefect(server, "deployment", "run", "dataset-watch/dataset-watch", "--params", json.dumps(params)).stdout
    watch_run = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    prefect(server, "worker", "start", "--pool", "loraflow", "--run-once")
    assert states(server, watch_run)[0] == "Completed"
    assert list((tmp_path / "store" / "watch").glob("*.json"))  # the fingerprint, recorded once sent

    triggered = triggered_run(server, seen=before)
    deployed = yaml.safe_load(PREFECT_YAML.read_text())["definitions"]["config"]
    with api(server), get_client(sync_client=True) as client:
        cfg = client.read_flow_run(triggered).parameters["cfg"]
        client.delete_flow_run(triggered)  # left scheduled, a later worker would run it
    assert cfg["dataset"]["source"] == str(shapes) and cfg["store"] == str(tmp_path / "store")
    assert cfg["train"] == deployed["train"]  # the rest: the dataset-watch deployment's config


def watch(env: dict, config: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "loraflow.cli", "watch", "--config", str(config)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def flow_runs(env: dict) -> set[str]:
    """Ids of the on-demand deployment's flow runs."""
    with api(env), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("finetune/on-demand")
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
    return {str(r.id) for r in runs}


def triggered_run(env: dict, seen: set[str], seconds: float = 60) -> str:
    """The one on-demand flow run the automation created since `seen`, once it exists."""
    deadline = time.monotonic() + seconds
    while not (new := flow_runs(env) - seen):
        assert time.monotonic() < deadline, "the trigger created no flow run"
        time.sleep(0.5)
    time.sleep(2)  # had it made a second run for the one event, that one would be here by now
    new = flow_runs(env) - seen
    assert len(new) == 1, new
    return new.pop()


def read_report(store: Path, flow_run_id: str) -> dict:
    return json.loads((store / "reports" / f"{flow_run_id}.json").read_text())
