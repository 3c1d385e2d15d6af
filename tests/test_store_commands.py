"""The store commands on real runs: `loraflow ls`, `show`, `gc` (alone and beside a live run) and
`export` (loaded back with diffusers' `load_lora_weights`, giving the run's own sample)."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraflow import cli
from loraflow.config import SamplerSettings
from loraflow.families import get_family
from loraflow.live import GC_MARKER
from loraflow.manifests import Embeddings, NullEmbedding
from loraflow.models import resolve_model
from loraflow.store import Store
from tasks.caching import read_manifest
from tests.helpers import finish, run, session_env, small_config, snapshot, start_cli, task_states


def command(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def files(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()}


def test_ls_and_show_list_runs_with_samples_by_prompt_and_step(shapes, tmp_path, capsys):
    cfg = small_config(tmp_path / "store", shapes, sample={"checkpoints": [3]})
    first, _ = run(cfg)
    second, _ = run(cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"seed": 5})}))
    code, out = command(capsys, "ls", "--store", cfg.store)
    assert code == 0
    lines = [line for line in out.splitlines() if line[:8] in (first.flow_run_id[:8], second.flow_run_id[:8])]
    assert [line[:8] for line in lines] == [first.flow_run_id[:8], second.flow_run_id[:8]]  # oldest first

    code, out = command(capsys, "show", second.flow_run_id[:8], "--store", cfg.store)
    assert code == 0 and second.flow_run_id in out
    for prompt in cfg.sample.prompts:  # each sample: its prompt, the step it was made at, where it is
        for step in (3, 6):
            assert any(f"step {step:5d}" in line and repr(prompt) in line and ".png" in line for line in out.splitlines())
    assert "sample" in out and "Completed" in out  # the stage table
    assert command(capsys, "show", "nosuchrun", "--store", cfg.store)[0] == 1


def test_gc_keeps_what_kept_runs_need_and_frees_the_rest(shapes, tmp_path, capsys):
    cfg = small_config(tmp_path / "store", shapes)
    store = Path(cfg.store)
    old, _ = run(cfg)
    (shapes / "red_circle_0.txt").write_text("a crimson circle\n")  # new captions: a new training run
    new, _ = run(cfg)
    leftover = store / "objects" / "latents" / "zz" / "half-written.safetensors.tmp-0123456789ab"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"x" * 1000)

    before = snapshot(store)
    code, out = command(capsys, "gc", "--keep", "1", "--dry-run", "--store", cfg.store)
    assert code == 0 and "would free" in out
    assert snapshot(store) == before  # a dry run deletes nothing

    checkpoints = len(list((store / "objects" / "checkpoints").rglob("*.safetensors")))
    code, out = command(capsys, "gc", "--keep", "1", "--store", cfg.store)
    assert code == 0 and "freed" in out
    assert not leftover.exists()
    assert not (store / "reports" / f"{old.flow_run_id}.json").exists()
    assert (store / "reports" / f"{new.flow_run_id}.json").exists()
    # Two runs of 2 checkpoints each: only the kept run's final one stays.
    assert checkpoints == 4 and len(list((store / "objects" / "checkpoints").rglob("*.safetensors"))) == 1
    freed = float(out.split("freed ")[1].split(" MiB")[0])
    assert freed > 0

    # The kept run is whole: running it again finds every stage Cached, and training longer
    # resumes from its final checkpoint.
    _, states = run(cfg)
    assert set(states.values()) == {"Cached"}
    longer, states = run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 9})}))
    assert states["train"] == "Completed"
    assert next(r for r in longer.tasks if r.task == "train").reused == 6  # resumed at step 6
    # The dropped run's config trains again (its training was collected), reusing every latent.
    (shapes / "red_circle_0.txt").write_text("a red circle\n")
    report, states = run(cfg)
    assert states["train"] == "Completed" and states["latents"] == "Cached"
    assert command(capsys, "gc", "--store", cfg.store)[0] == 0  # nothing to keep out: still fine


@pytest.mark.slow
def test_gc_during_a_live_run_deletes_nothing_and_the_run_loses_nothing(shapes, tmp_path, capsys):
    cfg = small_config(tmp_path / "store", shapes, train={"steps": 200, "checkpoint_every": 20})
    store = Path(cfg.store)
    run(small_config(tmp_path / "store", shapes))  # an earlier run: garbage for gc once it is gone
    proc = start_cli(cfg, tmp_path, "live", session_env(OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 600
    while not list((store / "objects" / "checkpoints").rglob("*.sha256"))[2:]:  # training, past 1 checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached training"
        time.sleep(0.2)
    present = files(store)
    code, out = command(capsys, "gc", "--keep", "0", "--store", cfg.store)
    assert code == 1 and "in progress" in out
    assert present <= files(store)  # nothing deleted
    finish(proc)
    report = json.loads((tmp_path / "live.json").read_text())
    live_states = task_states(report["flow_run_id"])
    assert live_states["train"] == "Completed" and set(live_states.values()) <= {"Completed", "Cached"}
    _, states = run(cfg)  # everything the live run made is there
    assert set(states.values()) == {"Cached"}
    assert command(capsys, "gc", "--keep", "1", "--store", cfg.store)[0] == 0  # once it is over, gc works


def test_a_run_waits_for_a_gc_in_progress(shapes, tmp_path):
    cfg = small_config(tmp_path / "store", shapes)
    store = Store(cfg.store)
    store.write_atomic(GC_MARKER, json.dumps({"gc": True, "heartbeat": time.time()}).encode())
    released = []

    def release() -> None:
        time.sleep(3)
        released.append(time.time())
        store.delete(GC_MARKER)

    threading.Thread(target=release).start()
    run(cfg)
    written = [p.stat().st_mtime for p in (Path(cfg.store) / "objects").rglob("*") if p.is_file()]
    assert released and min(written) >= released[0]  # no object written before the gc ended


@pytest.mark.parametrize("family,fmt,lr", [("sd", "kohya", 1e-2), ("sdxl", "kohya", 1e-2), ("flux", "diffusers", 1e-1)])
def test_exported_lora_loads_back_and_gives_the_runs_sample(shapes, tmp_path, capsys, family, fmt, lr):
    # alpha != rank: the export must carry the trained scale, not diffusers' default alpha = rank.
    # (The tiny Flux needs a larger step before its LoRA moves the 8-bit image at all.)
    cfg = small_config(tmp_path / "store", shapes, family, train={"rank": 4, "alpha": 2.0, "learning_rate": lr})
    report, _ = run(cfg)
    out = tmp_path / "exported" / "lora.safetensors"
    code, said = command(capsys, "export", report.flow_run_id[:8], "--format", fmt, "--out", str(out), "--store", cfg.store)
    assert code == 0 and out.exists(), said
    from safetensors.torch import load_file

    keys = list(load_file(out))
    if fmt == "kohya":
        assert all(k.startswith("lora_unet_") for k in keys)
        assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
        assert {float(v) for k, v in load_file(out).items() if k.endswith(".alpha")} == {2.0}

    # Load it as a user would, into the family's pipeline, and sample as the run did.
    store = Store(cfg.store)
    fam = get_family(family)
    model = resolve_model(cfg.model, {})
    pipe = fam.pipeline(model.denoiser.path, fam.load_denoiser(model.denoiser.path).eval(),
                        fam.load_vae(model.vae.path, torch.device("cpu")))
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    pipe.set_progress_bar_config(disable=True)
    prompts = _manifest(store, report, "encode-prompts[sample prompts]", Embeddings)
    null = _manifest(store, report, "null-embedding", NullEmbedding)
    settings = SamplerSettings(**cfg.sample.model_dump(exclude={"prompts", "prompts_file"}))
    ours = next(s for s in report.sample_images if s.step == cfg.train.steps and s.index == 0)
    cond = store.read_tensors(prompts.items[ours.prompt])
    image = fam.generate(pipe, cond, store.read_tensors(null.embedding), settings, cfg.dataset.resolution,
                         torch.Generator().manual_seed(settings.seed))
    sampled = Image.open(io.BytesIO(Path(ours.url).read_bytes()))
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(sampled, dtype=np.int16))
    assert diff.max() <= 2, diff.max()  # the same image, to 8-bit rounding of float differences

    # Without the LoRA the image is another one: the comparison above can fail.
    pipe.unload_lora_weights()
    base = fam.generate(pipe, cond, store.read_tensors(null.embedding), settings, cfg.dataset.resolution,
                        torch.Generator().manual_seed(settings.seed))
    assert np.abs(np.asarray(base, dtype=np.int16) - np.asarray(sampled, dtype=np.int16)).max() > 2


def _manifest(store: Store, report, label: str, manifest_type):
    row = next(r for r in report.tasks if r.label == label)
    manifest, problem = read_manifest(store.fs.cat_file(store.abs(f"records/{row.cache_key}")), manifest_type)
    assert problem is None
    return manifest
