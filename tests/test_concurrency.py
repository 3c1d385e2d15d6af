"""Two runs at once compute each stage once; a lock left by a killed run expires."""

from __future__ import annotations

import json
import os

import pytest

from loraflow.builtin import builtin_path
from tests.helpers import computed, finish, kill_while_training, session_env, small_config, start_cli, task_states

STAGES = ["captions", "prompts", "null", "latents", "train", "sample"]


def test_two_runs_started_together_compute_each_stage_once(shapes, tmp_path):
    """With a 1 s lease, training outlasts many leases: the holder's renewals keep the other run out."""
    cfg = small_config(tmp_path / "store", shapes, train={"steps": 300, "checkpoint_every": 100})
    builtin_path("tiny-sd")  # built once here, not by both runs at once
    # Two torch processes on a small machine: one thread each, or OpenMP's spinning threads starve both.
    runs = [start_cli(cfg, tmp_path, name, session_env(LORAFLOW_LOCK_LEASE_SECONDS="1", OMP_NUM_THREADS="1"))
            for name in ("a", "b")]
    for proc in runs:
        finish(proc)
    reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b")]
    both = [task_states(r["flow_run_id"]) for r in reports]
    for stage in STAGES:  # Prefect's own task-run states, read from the server
        assert sorted(states[stage] for states in both) == ["Cached", "Completed"], stage
    done = computed(reports)
    assert max(row["seconds"] for r in reports for row in r["tasks"] if row["task"] == "train") > 1  # > the lease
    images = len(list(shapes.glob("*.png")))
    assert done["latents"] == images  # each latent encoded once, in all
    captions = {p.read_text().strip() for p in shapes.glob("*.txt")}
    assert done["captions"] == len(captions)


@pytest.mark.slow
def test_lock_of_a_killed_run_expires(shapes, tmp_path):
    """A run SIGKILLed while training holds the train stage's lock. The next run waits at most
    one lease for it, then trains (resuming from the killed run's checkpoint)."""
    lease = "3"
    cfg = small_config(tmp_path / "store", shapes, train={"steps": 400, "checkpoint_every": 10})
    kill_while_training(cfg, tmp_path, session_env(LORAFLOW_LOCK_LEASE_SECONDS=lease))
    lock_dir = os.environ["LORAFLOW_HOME"] + "/locks"
    held = [json.loads(open(os.path.join(lock_dir, f)).read()) for f in os.listdir(lock_dir) if f.endswith(".lock")]
    assert held and all(lock["expiration"] for lock in held)  # left behind, with an expiry

    second = start_cli(cfg, tmp_path, "next", session_env(LORAFLOW_LOCK_LEASE_SECONDS=lease))
    out = finish(second)
    assert "resuming from step" in out
    states = task_states(json.loads((tmp_path / "next.json").read_text())["flow_run_id"])
    assert states["train"] == "Completed"
