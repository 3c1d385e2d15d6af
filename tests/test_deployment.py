"""End to end as teams run it: a real `prefect server start`, a process work pool, the
deployments from deployments/prefect.yaml, `prefect deployment run` and a real `prefect worker`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import free_port, wait_for
from tests.helpers import stage_of

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on loopback with its own home and database; yields the CLI's env."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false")
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-scheduler"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/api/health", 180)
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        prefect(env, "work-pool", "create", "loraflow", "--type", "process")
        prefect(env, "work-queue", "create", "training", "--pool", "loraflow", "--limit", "1")  # as the README says
        prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML.relative_to(REPO)))
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def prefect(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def deployment_run(env: dict, params: dict) -> str:
    """`prefect deployment run`, then one `prefect worker start --run-once`; returns the flow run id."""
    out = prefect(env, "deployment", "run", "finetune/on-demand", "--params", json.dumps(params)).stdout
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    prefect(env, "worker", "start", "--pool", "loraflow", "--run-once")
    return flow_run_id


def api(env: dict):
    return temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]})


def states(env: dict, flow_run_id: str) -> tuple[str, dict[str, str]]:
    with api(env), get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    return flow_run.state.name, {stage_of(r.name): r.state.name for r in runs}


def test_deployment_run_by_a_worker_then_everything_cached(server, tmp_path):
    # Nested fields override the deployment's config one by one; the rest (model, dataset,
    # prompts, ...) keep the values from prefect.yaml.
    params = {"cfg": {"store": str(tmp_path / "store"), "train": {"steps": 6, "checkpoint_every": 3},
                      "sample": {"steps": 2}}}
    first = deployment_run(server, params)
    flow_state, tasks = states(server, first)
    assert flow_state == "Completed"
    assert tasks == dict.fromkeys(["captions", "prompts", "null", "latents", "train", "sample"], "Completed")
    report = json.loads((tmp_path / "store" / "reports" / f"{first}.json").read_text())
    deployed = yaml.safe_load(PREFECT_YAML.read_text())["definitions"]["config"]
    assert len(report["samples"]) == len(deployed["sample"]["prompts"])  # from prefect.yaml
    assert report["weights"].startswith(str(tmp_path / "store"))  # from the run

    second = deployment_run(server, params)
    flow_state, tasks = states(server, second)
    assert flow_state == "Completed"
    assert tasks == dict.fromkeys(["captions", "prompts", "null", "latents", "train", "sample"], "Cached")


def test_nightly_schedule_is_the_cron_from_prefect_yaml(server):
    (nightly,) = [d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"] if d["name"] == "nightly"]
    with api(server), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("finetune/nightly")
    assert [s.schedule.cron for s in deployment.schedules] == [nightly["schedules"][0]["cron"]]
    assert [s.active for s in deployment.schedules] == [True]
    assert deployment.parameters["cfg"] == nightly["parameters"]["cfg"]


def test_parameter_of_the_wrong_type_is_refused_by_prefect(server, tmp_path):
    params = {"cfg": {"store": str(tmp_path / "store"), "train": {"steps": "many"}}}
    done = prefect(server, "deployment", "run", "finetune/on-demand", "--params", json.dumps(params), check=False)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "steps" in output and "valid" in output.lower(), output[-2000:]
    assert not (tmp_path / "store").exists()  # no run was created


def test_a_nightly_and_an_on_demand_run_take_turns(server, tmp_path):
    """Both deployments train on the pool's `training` queue, limited to one run at a time: with a
    nightly and an on-demand run due together, a worker starts one and leaves the other queued."""
    params = {"cfg": {"store": str(tmp_path / "store"), "train": {"steps": 3, "checkpoint_every": 3},
                      "sample": {"steps": 2}}}
    ids = [re.search(r"UUID: ([0-9a-f-]{36})", prefect(server, "deployment", "run", f"finetune/{name}", "--params",
                                                       json.dumps(params)).stdout).group(1)
           for name in ("nightly", "on-demand")]
    with api(server), get_client(sync_client=True) as client:
        for name in ("nightly", "on-demand"):
            deployment = client.read_deployment_by_name(f"finetune/{name}")
            assert deployment.work_queue_name == "training"
            assert deployment.global_concurrency_limit.limit == 1  # and never two runs of one deployment
    prefect(server, "worker", "start", "--pool", "loraflow", "--run-once")
    first = sorted(states(server, i)[0] for i in ids)
    assert first[0] == "Completed" and first[1] in ("Scheduled", "Late"), first  # one ran, one waits its turn
    prefect(server, "worker", "start", "--pool", "loraflow", "--run-once")
    assert [states(server, i)[0] for i in ids] == ["Completed", "Completed"]
