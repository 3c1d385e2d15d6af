"""Training options in real runs: a killed run with a decaying schedule, warmup, gradient
accumulation, EMA and Prodigy resumes bitwise; every step's metrics reach the store and TensorBoard;
options a machine or family cannot honour fail with one error naming the field."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from loraflow.dataset import generate_shapes
from loraflow.sealed import unsealed_json
from tests.helpers import finish, kill_while_training, report_states, run, session_env, small_config, start_cli

STEPS, EVERY = 20, 5
OPTIONS = {"steps": STEPS, "checkpoint_every": EVERY, "batch_size": 2, "lr_scheduler": "cosine", "lr_warmup_steps": 3,
           "gradient_accumulation_steps": 2, "ema_decay": 0.9, "optimizer": "prodigy", "learning_rate": 1.0,
           "log_every": 4}


def test_killed_run_with_every_option_resumes_bitwise(tmp_path):
    generate_shapes(tmp_path / "data", variants=1)
    cfg = small_config(tmp_path / "store", tmp_path / "data", train=OPTIONS | {"tensorboard_dir": str(tmp_path / "tb")},
                       sample={"prompts": []})
    # The killed run's lock lapses soon. All three runs are processes with the same environment: float
    # sums split over another number of torch threads round differently, and weights are compared
    # bitwise, so the uninterrupted run must not train in this process (whose threads earlier tests may
    # have changed).
    env = session_env(LORAFLOW_LOCK_LEASE_SECONDS="2")
    kill_while_training(cfg, tmp_path, env)
    finish(start_cli(cfg, tmp_path, "resumed", env))
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert report_states(tmp_path / "resumed.json")["train"] == "Completed"
    reused = next(t for t in resumed["tasks"] if t["task"] == "train")["reused"]
    assert reused % EVERY == 0 and 0 < reused < STEPS, "the first run must have been killed mid-training"

    finish(start_cli(small_config(tmp_path / "store-2", tmp_path / "data", train=OPTIONS, sample={"prompts": []}),
                     tmp_path, "fresh", env))
    fresh = json.loads((tmp_path / "fresh.json").read_text())
    assert next(t for t in fresh["tasks"] if t["task"] == "train")["reused"] == 0
    for a, b in [(resumed["weights"], fresh["weights"]), (resumed["ema_weights"], fresh["ema_weights"])]:
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys()
        assert all((x[k] == y[k]).all() for k in x), (a, b)

    # The metrics of both runs agree on every step (times aside); the resumed one kept the steps
    # before the kill from its checkpoint.
    ours, theirs = (json.loads(unsealed_json(open(m, "rb").read())) for m in (resumed["metrics"], fresh["metrics"]))
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    for a, b in zip(ours, theirs):
        assert {k: a[k] for k in ("step", "loss", "lr", "grad_norm")} == {k: b[k] for k in ("step", "loss", "lr", "grad_norm")}
    assert ours[0]["lr"] < ours[3]["lr"] and ours[-1]["lr"] < ours[3]["lr"]  # warmup, then the cosine decays
    assert load_file(resumed["ema_weights"]).keys() == load_file(resumed["weights"]).keys()
    assert any((load_file(resumed["ema_weights"])[k] != w).any() for k, w in load_file(resumed["weights"]).items())

    # TensorBoard: the killed and the resumed run wrote to the same folder; it holds every step once
    # (the resumed run purged what the killed one wrote after its checkpoint).
    events = EventAccumulator(str(next((tmp_path / "tb").iterdir()))).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in ours])

    # A progress line every `log_every` steps, with speed and time left.
    logs = flow_logs(fresh["flow_run_id"])
    progress = [m for m in logs if m.startswith("step ") and "steps/s" in m]
    assert [m.split()[1] for m in progress] == [f"{s}/{STEPS}" for s in range(4, STEPS + 1, 4)]
    assert all("ETA" in m and "loss" in m and "lr" in m for m in progress)


def flow_logs(flow_run_id: str) -> list[str]:
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def test_adamw8bit_on_a_cpu_names_the_field(tmp_path):
    generate_shapes(tmp_path / "data", variants=1)
    cfg = small_config(tmp_path / "store", tmp_path / "data", train={"optimizer": "adamw8bit"})
    with pytest.raises(ValueError, match="train.optimizer: adamw8bit .*needs a CUDA GPU"):
        run(cfg)


@pytest.mark.parametrize("family,setting,value", [("sd3", "snr_gamma", 5.0), ("flux", "noise_offset", 0.1),
                                                  ("sd", "precondition_outputs", True)])
def test_an_objective_option_the_family_lacks_names_the_field(tmp_path, family, setting, value):
    generate_shapes(tmp_path / "data", variants=1)
    cfg = small_config(tmp_path / "store", tmp_path / "data", family, train={setting: value})
    with pytest.raises(ValueError, match=f"train.{setting}: the {family} family's objective has no such option"):
        run(cfg)
    assert not (tmp_path / "store" / "objects").exists()  # refused before any task ran


@pytest.mark.parametrize("train,message", [
    ({"method": "full", "base_dtype": "bfloat16", "mixed_precision": "bf16"}, "train.base_dtype: bfloat16 is for a frozen base"),
    ({"base_dtype": "bfloat16"}, "train.base_dtype: bfloat16 needs train.mixed_precision: bf16"),
])
def test_a_base_dtype_that_cannot_train_names_the_field(tmp_path, train, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path / "store", tmp_path / "data", train=train)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_on_a_bfloat16_base_trains_and_samples(tmp_path, family):
    """The transformer families too: the base loads in bf16 (diffusers' torch_dtype), the LoRA
    trains in float32 under bf16 autocast, and sampling loads it onto the float32 pipeline."""
    generate_shapes(tmp_path / "data", variants=1)
    cfg = small_config(tmp_path / "store", tmp_path / "data", family,
                       train={"base_dtype": "bfloat16", "mixed_precision": "bf16", "learning_rate": 1e-2})
    report, states = run(cfg)
    assert states["train"] == "Completed" and states["sample"] == "Completed"
    weights = load_file(report.weights)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert any((t != 0).any() for name, t in weights.items() if "lora_B" in name or "lora.up" in name)  # it learned


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    """Recomputing activations in the backward pass changes memory, not what is learned (so it is in
    no key): a run with it ends with the weights of a run without it."""
    generate_shapes(tmp_path / "data", variants=1)
    reports = [run(small_config(tmp_path / f"store-{on}", tmp_path / "data", train={"gradient_checkpointing": on},
                                sample={"prompts": []}))[0] for on in (False, True)]
    plain, checkpointed = (load_file(r.weights) for r in reports)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-6), name


DATA_PARALLEL = {"steps": 6, "checkpoint_every": 3, "lr_warmup_steps": 0, "log_every": 3}


def test_two_processes_of_batch_two_train_as_one_process_of_batch_four(tmp_path):
    """`train.processes: 2` (accelerate launch, gloo between CPU processes): each rank trains on its
    half of every step's batch of four, and DDP averages their gradients."""
    generate_shapes(tmp_path / "data", variants=1)

    def weights(name, **train):
        report, states = run(small_config(tmp_path / name, tmp_path / "data", train=DATA_PARALLEL | train,
                                          sample={"prompts": []}))
        assert states["train"] == "Completed"
        return report, load_file(report.weights)

    report, two = weights("two", batch_size=2, processes=2)
    _, one = weights("one", batch_size=4)
    _, half = weights("half", batch_size=2)  # what one rank alone would learn
    assert two.keys() == one.keys()
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=1e-4, atol=1e-6), name
    assert max((half[k] - one[k]).abs().max() for k in one) > 100 * max((two[k] - one[k]).abs().max() for k in one)
    # Rank 0's progress lines reached the task's log.
    progress = [m for m in flow_logs(report.flow_run_id) if m.startswith("step ") and "steps/s" in m]
    assert [m.split()[1] for m in progress] == ["3/6", "6/6"]


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_bitwise(tmp_path):
    generate_shapes(tmp_path / "data", variants=1)
    train = {"steps": 12, "checkpoint_every": 3, "batch_size": 2, "processes": 2}
    env = session_env(LORAFLOW_LOCK_LEASE_SECONDS="2")
    cfg = small_config(tmp_path / "store", tmp_path / "data", train=train, sample={"prompts": []})
    kill_while_training(cfg, tmp_path, env)  # its ranks die with it
    finish(start_cli(cfg, tmp_path, "resumed", env))
    finish(start_cli(cfg.model_copy(update={"store": str(tmp_path / "store-2")}), tmp_path, "fresh", env))
    resumed, fresh = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("resumed", "fresh"))
    reused = next(t for t in resumed["tasks"] if t["task"] == "train")["reused"]
    assert reused % 3 == 0 and 0 < reused < 12, "the first run must have been killed mid-training"
    x, y = load_file(resumed["weights"]), load_file(fresh["weights"])
    assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def test_wandb_offline_run_has_every_steps_scalars(tmp_path, monkeypatch):
    """`train.wandb_project`: the per-step scalars TensorBoard gets go to a W&B run too (offline
    here), whose id is the training run's (the TensorBoard folder's name), finished with exit code 0."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    generate_shapes(tmp_path / "data", variants=1)
    cfg = small_config(tmp_path / "store", tmp_path / "data", sample={"prompts": []},
                       train={"wandb_project": "loraflow-test", "log_every": 3, "tensorboard_dir": str(tmp_path / "tb")})
    report, states = run(cfg)
    assert states["train"] == "Completed"
    rows = json.loads(unsealed_json(open(report.metrics, "rb").read()))

    (run_file,) = (tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    (tensorboard_run,) = (tmp_path / "tb").iterdir()
    assert started.project == "loraflow-test" and started.run_id == tensorboard_run.name
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               | {"step": r.history.step.num}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["step"] for h in history] == [r["step"] for r in rows] == list(range(1, 7))
    for name in ("loss", "lr", "grad_norm"):
        assert [h[f"train/{name}"] for h in history] == pytest.approx([r[name] for r in rows])
    assert [h["step"] for h in history if "train/steps_per_second" in h] == [3, 6]
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


def read_wandb_records(path):
    """The protobuf records of a W&B run file (wandb 0.31 reads them in Go only): a 7-byte header,
    then 32 KiB blocks of chunks (crc32, length, type: full, first, middle, last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_project_without_wandb_names_the_field(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    generate_shapes(tmp_path / "data", variants=1)
    cfg = small_config(tmp_path / "store", tmp_path / "data", train={"wandb_project": "loraflow-test"})
    with pytest.raises(ValueError, match=r"train.wandb_project: .*needs wandb"):
        run(cfg)
    assert not (tmp_path / "store" / "objects").exists()  # refused before any task ran
