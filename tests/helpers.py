"""Running the real flow (in this process or as `loraflow run`), reading Prefect's own task-run
states back from its API, and looking into stores."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL

from flows.finetune import finetune
from loraflow.config import RunConfig
from loraflow.plan import plan
from loraflow.report import Report

STAGES = ["captions", "prompts", "null", "latents", "train", "sample"]
STAGE_LABELS = {
    "encode-prompts[captions]": "captions",
    "encode-prompts[sample prompts]": "prompts",
    "null-embedding": "null",
    "build-latent-cache": "latents",
    "train": "train",
    "sample": "sample",
}
SHARD = re.compile(r"\[\d+/\d+\]$| \d+/\d+(?=\]$)")  # "[3/16]" alone, or " 3/16" after a role


def stage_of(task_run_name: str) -> str:
    """The stage a task run belongs to: "build-latent-cache[3/16]" and "encode-prompts[captions 3/16]"
    are shards of "latents" and "captions"."""
    return STAGE_LABELS[SHARD.sub("", task_run_name)]


FAMILIES = ["sd", "sdxl", "sd3", "flux", "sana"]
T5_OR_GEMMA = ("sd3", "flux", "sana")


def small_config(store: Path, dataset: Path, family: str = "sd", **sections) -> RunConfig:
    """A config that trains and samples in seconds on the tiny model."""
    cfg = {
        "model": {"family": family, "source": f"builtin:tiny-{family}"},
        # Buckets (on by default for SDXL, SD3, Flux) in steps of 8 px: 64 would leave none at 32 px.
        "dataset": {"source": str(dataset), "resolution": 32, "bucket_step": 8},
        "encoder": {"max_length": 16} if family in T5_OR_GEMMA else {},  # CLIP families: 77
        "train": {"steps": 6, "checkpoint_every": 3, "batch_size": 4},
        "sample": {"prompts": ["a red circle", "a blue square"], "steps": 2, "guidance_scale": 3.0},
        "store": str(store),
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return RunConfig.model_validate(cfg)


def run(cfg: RunConfig, check_plan: bool = False) -> tuple[Report, dict[str, str]]:
    """Run the flow; return its report and {stage: Prefect state name} read from the API.
    `check_plan`: first ask `loraflow plan`, and check that each task run's state and key are
    what it said."""
    planned = {p.label: (p.state, p.cache_key) for p in plan(cfg)} if check_plan else None
    state = finetune(cfg, return_state=True)
    report: Report = state.result()
    flow_run_id = state.state_details.flow_run_id
    if check_plan:  # states from Prefect's API; keys from the report (the API does not keep them)
        keys = {r.label: r.cache_key for r in report.tasks}
        actual = {r.name: (r.state.name, keys.get(r.name)) for r in final_task_runs(flow_run_id)}
        assert planned == actual, f"plan {planned}\n!= run {actual}"
    return report, task_states(flow_run_id)


def task_states(flow_run_id) -> dict[str, str]:
    """{stage: Prefect state name} (for a sharded stage, see `one_state`)."""
    return {stage: one_state(states) for stage, states in shard_states(flow_run_id).items()}


def shard_states(flow_run_id) -> dict[str, list[str]]:
    """{stage: Prefect state name of each of its task runs (one per shard), in shard order}."""
    runs = final_task_runs(flow_run_id)
    states: dict[str, list[str]] = {}
    for r in sorted(runs, key=lambda r: shard_index(r.name)):
        states.setdefault(stage_of(r.name), []).append(r.state.name)
    return states


def final_task_runs(flow_run_id, seconds: float = 60) -> list:
    """The flow run's task runs once the server has recorded a final state for each: Prefect
    sends task-run states as events, which the server records a moment after the flow returns."""
    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if all(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


def shard_index(task_run_name: str) -> int:
    found = re.search(r"(\d+)/\d+\]$", task_run_name)
    return int(found.group(1)) if found else 0


def one_state(states: list[str]) -> str:
    """The state all of a stage's task runs are in, or how many are in which ("Cached 7, Completed 1")."""
    if len(set(states)) == 1:
        return states[0]
    return ", ".join(f"{state} {states.count(state)}" for state in sorted(set(states)))


def report_states(path: Path) -> dict[str, str]:
    """{stage: Prefect state name} from the run report a CLI run wrote with `--report`."""
    report = Report.model_validate_json(path.read_text())
    states: dict[str, list[str]] = {}
    for r in report.tasks:
        states.setdefault(stage_of(r.label), []).append(r.state)
    return {stage: one_state(s) for stage, s in states.items()}


def computed(reports: list[dict]) -> Counter:
    """{stage: items computed}, summed over the shards and the JSON run reports of several runs."""
    total = Counter()
    for report in reports:
        for r in Report.model_validate(report).tasks:
            total[stage_of(r.label)] += r.computed
    return total


def session_env(**extra: str) -> dict[str, str]:
    """This process's environment, pointed at the test session's Prefect server, plus `extra`."""
    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), **extra}


def start_cli(config: RunConfig, folder: Path, name: str, env: dict[str, str] | None = None,
              **popen) -> subprocess.Popen:
    """`loraflow run` in a process of its own (against the session's server unless `env` says
    otherwise), its config in `<name>.yaml` and its report in `<name>.json`."""
    (folder / f"{name}.yaml").write_text(json.dumps(config.model_dump()))
    return subprocess.Popen(
        [sys.executable, "-m", "loraflow.cli", "run", "--config", str(folder / f"{name}.yaml"),
         "--report", str(folder / f"{name}.json")],
        env=env or session_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def kill_while_training(config: RunConfig, folder: Path, env: dict[str, str]) -> None:
    """`loraflow run` as "killed", SIGKILLed once it has stored a checkpoint (it holds the train lock)."""
    proc = start_cli(config, folder, "killed", env)
    checkpoints = Path(config.store) / "objects" / "checkpoints"
    deadline = time.monotonic() + 600
    while not any(checkpoints.rglob("*.sha256")):  # training has started and holds its lock
        assert proc.poll() is None and time.monotonic() < deadline, "the first run never reached training"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out


def snapshot(store: Path, under: str = "") -> dict[str, str]:
    """sha256 of every file in a store (or in its folder `under`), by path; run reports left out.
    Training metrics objects hold wall-clock times, so only their presence counts, not their bytes."""
    return {str(p.relative_to(store)): "metrics" if "metrics" in p.parts else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((store / under).rglob("*")) if p.is_file() and "reports" not in p.parts}


def stored_latents(cfg: RunConfig, with_names: bool = False) -> list[dict]:
    """The latent objects a run used, read back from its store by their keys (each cut to its
    bucket when the run used buckets); `with_names` adds the image's file name as "image"."""
    from loraflow.buckets import cut_size, plan_buckets
    from loraflow.dataset import load_dataset
    from loraflow.families import get_family
    from loraflow.models import resolve_model
    from loraflow.store import Store
    from tasks.latent_cache import latent_key

    store = Store(cfg.store)
    model = resolve_model(cfg.model)
    fam, d = get_family(model.family), cfg.dataset
    buckets = plan_buckets(d, fam.buckets_by_default, fam.resolution_multiple(model.vae.path))
    found = []
    for image in load_dataset(d):
        key = latent_key(model.family, model.vae, image, cut_size(image.height, image.width, d.resolution, buckets),
                         d.center_crop, d.flip)
        tensors = store.read_tensors(store.find("latents", key, "safetensors"))
        found.append(tensors | ({"image": image.name} if with_names else {}))
    return found


def user_pipeline(family: str, cfg: RunConfig):
    """What a user does: the family's full diffusers pipeline (text encoders included) from the tiny
    model's folder, and `generate(prompt)`, its image (as int16 pixels) made with the settings
    loraflow samples with."""
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from loraflow.builtin import builtin_path

    pipe = DiffusionPipeline.from_pretrained(builtin_path(f"tiny-{family}"))
    size = cfg.dataset.resolution
    kwargs = dict(num_inference_steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance_scale, height=size, width=size)
    if family in ("sd", "sdxl"):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if family == "sdxl":
        kwargs |= dict(negative_prompt="")  # the null embedding; without it SDXL guides from zeros
    if family in T5_OR_GEMMA:
        kwargs |= dict(max_sequence_length=cfg.encoder.max_length)
    if family == "flux":  # true CFG from the empty prompt; guidance_scale is the embedded guidance
        kwargs |= dict(negative_prompt="", true_cfg_scale=cfg.sample.guidance_scale,
                       guidance_scale=cfg.sample.guidance_embedding)
    if family == "sana":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        kwargs |= dict(use_resolution_binning=False, complex_human_instruction=None)

    def generate(prompt: str):
        image = pipe(prompt, generator=torch.Generator().manual_seed(cfg.sample.seed), **kwargs).images[0]
        return np.asarray(image, dtype=np.int16)

    return pipe, generate


def row(report: Report, stage: str):
    """The report row of a stage that ran as one task run (one shard)."""
    (match,) = [r for r in report.tasks if stage_of(r.label) == stage]
    return match


def stored_manifest(report: Report, label: str, manifest_type):
    """The manifest a run's task run (by its label) handed downstream, read from its cache record."""
    from loraflow.store import Store
    from tasks.caching import read_manifest

    store = Store(report.store)
    match = next(r for r in report.tasks if r.label == label)
    manifest, problem = read_manifest(store.fs.cat_file(store.abs(f"records/{match.cache_key}")), manifest_type)
    assert problem is None
    return manifest


def resample(cfg: RunConfig, report: Report, pipe) -> tuple[np.ndarray, np.ndarray]:
    """(what `pipe` makes for the run's first final-step sample, from the run's cached embeddings
    and its sampler settings; that sample as the run stored it), as int16 pixel arrays."""
    from loraflow.families import get_family
    from loraflow.manifests import Embeddings, NullEmbedding
    from loraflow.store import Store

    store = Store(report.store)
    prompts = stored_manifest(report, "encode-prompts[sample prompts]", Embeddings)
    null = stored_manifest(report, "null-embedding", NullEmbedding)
    ours = next(s for s in report.sample_images if s.step == cfg.train.steps and s.index == 0)
    settings = cfg.sample.sampler()
    image = get_family(cfg.model.family).generate(
        pipe, store.read_tensors(prompts.items[ours.prompt]), store.read_tensors(null.embedding), settings,
        cfg.dataset.resolution, torch.Generator().manual_seed(settings.seed))
    sampled = Image.open(io.BytesIO(Path(ours.url).read_bytes()))
    return np.asarray(image, dtype=np.int16), np.asarray(sampled, dtype=np.int16)


@contextmanager
def mounted(folder: Path, options: str):
    """A tmpfs mounted on `folder` for the block (`options` as for `mount -o`), e.g. a small disk
    that fills up, or one remounted read-only. Skips the test where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)
