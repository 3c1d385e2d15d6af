"""Faults around whole runs: Ctrl-C / SIGTERM in every stage, and several runs started together.

Each test drives `loraflow run` in real processes, as a user or a worker would, and judges the
outcome from the store, the run reports and Prefect's task-run states.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from loraflow.dataset import generate_shapes
from tests.helpers import STAGES, computed, report_states, run, session_env, small_config, snapshot, start_cli

pytestmark = pytest.mark.fault

SAMPLE_PROMPTS = [f"a red circle, take {i}" for i in range(12)]
TRAIN = {"steps": 60, "checkpoint_every": 10, "batch_size": 4}


def objects(store: Path, kind: str) -> int:
    return len(list((store / "objects" / kind).glob("*/*.sha256")))


# --- Ctrl-C and SIGTERM -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """A dataset whose every stage lasts long enough to be interrupted in its middle: 36 images with
    36 distinct captions, 12 sample prompts, 60 training steps. Plus an uninterrupted run of it."""
    root = tmp_path_factory.mktemp("interrupts")
    generate_shapes(root / "data", variants=3)
    for n, caption in enumerate(sorted((root / "data").glob("*.txt"))):
        caption.write_text(f"{caption.read_text().strip()}, picture {n}\n")
    reference, _ = run(busy_config(root / "reference", root / "data"))
    return root, snapshot(root / "reference", "objects"), Path(reference.weights).name


def busy_config(store: Path, data: Path):
    # Encoders one item per pass: each stored object is a point at which a signal can be aimed.
    cfg = small_config(store, data, train=TRAIN, sample={"prompts": SAMPLE_PROMPTS}, encoder={"batch_size": 1})
    return cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"encode_batch_size": 1})})


# When to interrupt each stage: once it has stored some, not all, of its objects.
STAGE_STARTED = {
    "captions": lambda s: objects(s, "embeddings") >= 5,
    "prompts": lambda s: objects(s, "embeddings") >= 36 + 3,
    "null": lambda s: objects(s, "embeddings") >= 36 + 12,  # the last prompt is stored: null is next
    "latents": lambda s: objects(s, "latents") >= 5,
    "train": lambda s: objects(s, "checkpoints") >= 2,
    "sample": lambda s: objects(s, "samples") >= 3,
}
TASK_OF_STAGE = {"captions": "encode-prompts[captions 1/1]", "prompts": "encode-prompts[sample prompts]",
                 "null": "null-embedding", "latents": "build-latent-cache[1/1]", "train": "train", "sample": "sample"}
# null-embedding encodes one prompt in ~0.1 s and stores nothing before it ends, so no store event
# marks its middle: a signal aimed at it lands around it (the stage before, the flow between two
# tasks, or the stage after). The test still proves a stop there exits fast and resumes exactly.
AIMED = {stage: f"Task run '{task}'" for stage, task in TASK_OF_STAGE.items()}
AIMED["null"] = ""


# The default run stops one stage (training, by SIGTERM); `-m slow` stops every stage by both signals.
INTERRUPTIONS = [pytest.param(stage, signum, id=f"{stage}-{signum.name}",
                              marks=() if (stage, signum) == ("train", signal.SIGTERM) else pytest.mark.slow)
                 for stage in STAGES for signum in (signal.SIGINT, signal.SIGTERM)]


@pytest.mark.parametrize("stage,signum", INTERRUPTIONS)
def test_interrupted_stage_exits_quickly_and_next_run_resumes(busy, tmp_path, stage, signum):
    root, reference, reference_weights = busy
    store = tmp_path / "store"
    cfg = busy_config(store, root / "data")
    # Against the session's server. With as many threads as this process's runs: float sums split
    # over another number of threads round differently, and the weights are compared bit for bit.
    proc = start_cli(cfg, tmp_path, "interrupted", session_env())
    while not STAGE_STARTED[stage](store):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signum)
    signalled = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    assert time.monotonic() - signalled < 10, f"took {time.monotonic() - signalled:.1f} s to stop"
    assert proc.returncode == 128 + signum, out[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in out and "Traceback" not in out
    crashed = [line for line in log_of(out).splitlines() if "Finished in state Crashed" in line]
    assert any(AIMED[stage] in line for line in crashed), crashed  # hit where aimed

    # What the interrupted run finished is kept, nothing half-written counts, and the next run
    # resumes: every object ends up bit-for-bit what an uninterrupted run stores.
    assert not [p for p in store.rglob("*.tmp-*")], "temporary files left behind"
    report, states = run(cfg)
    assert set(states.values()) <= {"Completed", "Cached"}
    assert Path(report.weights).name == reference_weights
    assert snapshot(store, "objects") == reference


def log_of(cli_output: str) -> str:
    """The full log file a CLI run names on its last line."""
    path = cli_output.rsplit("(full log: ", 1)[1].split(")", 1)[0]
    return Path(path).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["latents", "train"])
def test_ctrl_c_in_a_terminal_stops_the_run_and_its_embedded_server(busy, tmp_path, stage):
    """Ctrl-C signals the terminal's whole process group: with no PREFECT_API_URL, the run's own
    Prefect server must not die first (the run would then retry reporting to it for a minute).
    In the latent cache the group holds its helper processes too: they leave the stop to the run."""
    root, reference, reference_weights = busy
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), OMP_NUM_THREADS="1")
    cfg = busy_config(tmp_path / "store", root / "data")
    proc = start_cli(cfg, tmp_path, "terminal", env, start_new_session=True)  # its own process group, as in a shell
    while not STAGE_STARTED[stage](tmp_path / "store"):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    signalled = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    assert time.monotonic() - signalled < 10, f"took {time.monotonic() - signalled:.1f} s to stop"
    assert proc.returncode == 130 and "stopped by SIGINT" in out and "Traceback" not in out, out[-3000:]
    assert f"{AIMED[stage]} - Finished in state Crashed" in log_of(out)
    assert "Error logging to API" not in out  # the server outlived the run's last report
    time.sleep(1)
    assert subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).stdout == b"", \
        "a process of the run's session outlived it"


# --- several runs at once on one machine ---------------------------------------------------------
ROUNDS = int(os.environ.get("LORAFLOW_FAULT_ROUNDS", "1"))


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_four_runs_started_together(tmp_path, round_):
    """Four `loraflow run` of one config, started together on a fresh machine (empty LORAFLOW_HOME and
    Prefect home, no Prefect server: each run starts its embedded one), then four more on the now warm
    machine against a fresh store. Every run succeeds with identical results, and each stage's items
    are computed once in total."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(LORAFLOW_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"), OMP_NUM_THREADS="1")
    for machine in ("cold", "warm"):
        store = tmp_path / machine / "store"
        cfg = small_config(store, "builtin:shapes")
        folder = tmp_path / machine
        folder.mkdir()
        runs = [start_cli(cfg, folder, f"run{i}", env) for i in range(4)]
        outputs = [proc.communicate(timeout=900)[0] for proc in runs]
        for proc, out in zip(runs, outputs):
            assert proc.returncode == 0, f"{machine}: {out[-3000:]}"
            assert "Traceback" not in out and "UNIQUE constraint" not in out, out[-3000:]
        reports = [json.loads((folder / f"run{i}.json").read_text()) for i in range(4)]
        assert len({r["weights"] for r in reports}) == 1
        assert len({tuple(r["samples"]) for r in reports}) == 1
        done = computed(reports)
        images = 24  # builtin:shapes: 4 colours x 3 shapes x 2 variants
        assert done["latents"] == images
        assert done["captions"] == 12
        assert done["prompts"] == 0  # both sample prompts are captions too
        assert done["train"] == cfg.train.steps
        assert done["sample"] == len(cfg.sample.prompts) * cfg.sample.images_per_prompt
        for i in range(4):  # Prefect's own states: each stage Completed by exactly one run
            assert set(report_states(folder / f"run{i}.json").values()) <= {"Completed", "Cached"}
        completed = Counter(stage for i in range(4) for stage, state in report_states(folder / f"run{i}.json").items()
                            if state == "Completed")
        assert completed == Counter(STAGES), completed
    assert snapshot(tmp_path / "cold" / "store", "objects") == snapshot(tmp_path / "warm" / "store", "objects")
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


def test_a_signal_that_surfaces_as_another_error_is_still_a_stop(capfd, monkeypatch):
    """A signal landing in cleanup code (say, between a COMMIT and its ROLLBACK guard) can unwind
    as some other exception: the run was still stopped by the signal, and says so."""
    import sqlite3

    import loraflow.cli as cli

    def interrupted_cleanup(cfg, report_file, log_file):
        try:
            cli._raise_stopped(signal.SIGTERM, None)
        except KeyboardInterrupt:
            raise sqlite3.OperationalError("cannot rollback - no transaction is active") from None

    monkeypatch.setattr(cli, "run_flow", interrupted_cleanup)
    assert cli.main(["run"]) == 128 + signal.SIGTERM
    err = capfd.readouterr().err
    assert "stopped by SIGTERM" in err and "cannot rollback" not in err
    assert cli.main.__globals__["_signalled"] == []  # a later run in this process starts clean
