"""The training loop, read top to bottom: in this process, or data-parallel over `train.processes`
ranks started by `accelerate launch`.

Every rank draws the same randomness from the same seeded generator for the whole global batch
(`batch_size` x ranks): which examples, which mirrored latents, which captions dropped, the noise
and timesteps. Each takes its own rows, and accelerate's DDP averages the gradients, so N ranks of
batch B train as one process of batch N x B would (to float rounding). The generator is therefore
the same on every rank, and one saved state resumes all of them. Rank 0 alone writes to the store.

Every `checkpoint_every` steps the exported weights (and their EMA) are stored, then a checkpoint
(optimizer, LR schedule, EMA, generator and global torch RNG state, the metrics so far); a run with the same key
resumes from the latest intact one, bitwise as if it had never stopped.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import cast_training_params
from pydantic import BaseModel
from safetensors.torch import load as load_safetensors

from loraflow.builtin import cache_root
from loraflow.children import die_with_parent
from loraflow.config import TrainConfig
from loraflow.families import _LOADING, get_family
from loraflow.hashing import content_key
from loraflow.manifests import Examples, NullEmbedding, Weights
from loraflow.host_memory import return_freed_memory, trim
from loraflow.metrics import TrainingLog, start_wandb_run
from loraflow.models import Component
from loraflow.optim import flatten, make_ema, make_optimizer, make_schedule, unflatten
from loraflow.precision import autocast_quantized, base_load_options, check_precision
from loraflow.store import ListRef, Store, safetensors_metadata
from loraflow.training_data import StoreExamples
from loraflow.weights import export_weights, import_weights


class TrainJob(BaseModel):
    """What the train task hands the loop (and, as JSON, every launched rank)."""

    family: str
    denoiser: Component
    examples: ListRef
    null: NullEmbedding | None
    hp: TrainConfig
    run_key: str  # names the checkpoints: the training inputs, less what a resume may change
    store_url: str
    storage_options: dict[str, Any] = {}


OnStep = Callable[[int], None]  # called with each step done (the train task's progress artifact)


def train(job: TrainJob, logger: logging.Logger | logging.LoggerAdapter, progress: OnStep | None = None) -> Weights:
    # Start from what the flow's process holds, not from what it let go of that sits in reference
    # cycles (the shards' manifests, through Prefect's states of their task runs): collected here,
    # where training runs (a cached run does not pay for it), and before training's peak.
    gc.collect()
    trim()
    if job.hp.processes > 1:
        return launch(job, logger, progress)
    with _LOADING:  # accelerate's state is process-wide: one run sets it up at a time
        AcceleratorState._reset_state()  # this run's mixed precision, not the previous run's
        accelerator = Accelerator(mixed_precision=job.hp.mixed_precision)
    return run(job, accelerator, logger, progress)


def run(job: TrainJob, accelerator: Accelerator, logger: logging.Logger | logging.LoggerAdapter,
        progress: OnStep | None = None) -> Weights:
    hp, fam, main = job.hp, get_family(job.family), accelerator.is_main_process
    rank, ranks = accelerator.process_index, accelerator.num_processes
    store = Store(job.store_url, job.storage_options)

    # Data: everything comes from the store by the refs upstream handed us, read as steps need it.
    data = StoreExamples(store, Examples.read(store, job.examples), budget_bytes=hp.data_cache_mb * 2**20)
    buckets = data.buckets()  # example indices per size
    if hp.caption_dropout > 0 and job.null is None:
        raise ValueError("train.caption_dropout > 0 needs the null embedding")
    null_cond = store.read_tensors(job.null.embedding) if hp.caption_dropout > 0 else None

    # Model, optimizer, schedule and EMA, on accelerate's device (a GPU when there is one).
    device = accelerator.device
    check_precision(hp, device)
    torch.manual_seed(hp.seed)
    model = fam.load_denoiser(job.denoiser.path, **base_load_options(hp))  # its dtype, maybe quantized
    if hp.base_quantization:
        autocast_quantized(model)
    if hp.method == "lora":
        model.requires_grad_(False)
        fam.add_lora(model, hp)
        cast_training_params(model, dtype=torch.float32)  # the LoRA trains in float32 on any base
    if hp.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(hp, params, device)
    lr_schedule = make_schedule(hp, optimizer)  # stepped once per optimizer step, on every rank
    ema = make_ema(hp, params)
    schedule = fam.load_noise_schedule(job.denoiser.path)
    generator = torch.Generator().manual_seed(hp.seed)
    state = State(model, params, optimizer, lr_schedule, ema, generator, accelerator.scaler)

    start, steps, ema_steps, rows = resume(store, job.run_key, hp, fam, state)
    if start and main:
        logger.info("resuming from step %d (checkpoint %s)", start, checkpoint_key(job.run_key, start)[:12])
    wandb_run = start_wandb_run(hp.wandb_project, job.run_key, hp.model_dump()) if main and hp.wandb_project else None
    with TrainingLog(logger if main else logging.getLogger("loraflow.rank"),
                     tensorboard_dir(hp, job.run_key) if main else None, start, hp.steps, hp.log_every, rows,
                     progress if main else None, wandb_run) as log:  # closed (the W&B run finished) on any exit
        # DDP over the ranks, the forward pass under accelerate's autocast for mixed precision, and for
        # fp16 the loss scaled (`backward`), gradients unscaled before clipping and steps with inf or
        # NaN gradients skipped (the prepared optimizer). Without fp16 the optimizer steps as it is.
        ddp, optimizer = accelerator.prepare(model, optimizer)

        model.train()
        for step in range(start, hp.steps):
            # One optimizer step over `gradient_accumulation_steps` batches.
            losses, images = [], 0
            for micro in range(hp.gradient_accumulation_steps):
                x, cond, draws = next_batch(data, buckets, generator, null_cond, hp, fam, schedule, device, rank, ranks)
                images += len(x["latent"])  # fewer than batch_size from a bucket smaller than it
                last = micro == hp.gradient_accumulation_steps - 1
                with nullcontext() if last else accelerator.no_sync(ddp):  # gradients meet once per step
                    loss = fam.training_loss(ddp, schedule, x, cond, draws, hp)
                    accelerator.backward(loss / hp.gradient_accumulation_steps)
                losses.append(loss.detach())
            if hp.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(params, hp.max_grad_norm)
            else:
                accelerator.unscale_gradients()
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            if not optimizer.step_was_skipped:  # as accelerate's prepared schedulers do
                lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)
            done = step + 1
            loss = torch.stack(losses).mean()
            if ranks > 1:
                loss = accelerator.reduce(loss, "mean")
                images = int(accelerator.reduce(torch.tensor(images, device=device), "sum").item())
            log.step(done, loss.item(), lr, grad_norm.item(), images)
            if done % hp.checkpoint_every == 0 or done == hp.steps:
                if main:
                    log.flush()
                    steps[done], ema_weights = save_checkpoint(store, job.run_key, done, hp, fam, state, log.rows)
                    if ema_weights:
                        ema_steps[done] = ema_weights
                    logger.info("step %d/%d: checkpoint stored", done, hp.steps)
                accelerator.wait_for_everyone()
    data.close()
    metrics = store.put_json("metrics", checkpoint_key(job.run_key, hp.steps), log.rows) if main else None
    return Weights(method=hp.method, final_step=hp.steps, steps=steps, ema=ema_steps, metrics=metrics,
                   computed=hp.steps - start, reused=start)


class State:
    """Everything a checkpoint saves and a resume restores, besides the step."""

    def __init__(self, model, params, optimizer, lr_schedule, ema, generator, grad_scaler=None):
        self.model, self.params, self.optimizer = model, params, optimizer
        self.lr_schedule, self.ema, self.generator = lr_schedule, ema, generator
        self.grad_scaler = grad_scaler  # fp16's loss scale (None without fp16)

    def stateful(self) -> dict:
        return {"optimizer": self.optimizer, "lr_schedule": self.lr_schedule, "ema": self.ema,
                "grad_scaler": self.grad_scaler}


def next_batch(data, buckets, generator, null_cond, hp, fam, schedule, device, rank=0, ranks=1):
    """This rank's rows of a global batch of `hp.batch_size` x `ranks` examples, all drawn from the
    generator: (latents and how they were cut, caption tensors, the objective's draws). With several
    buckets a bucket is drawn first (in proportion to its examples), then examples from it only; a
    bucket smaller than the global batch gives a smaller one."""
    size = hp.batch_size * ranks
    if len(buckets) == 1:
        batch = torch.randperm(len(data), generator=generator)[:size].tolist()
    else:
        counts = torch.tensor([len(b) for b in buckets], dtype=torch.float64)
        members = buckets[torch.multinomial(counts, 1, generator=generator).item()]
        batch = members[torch.randperm(len(members), generator=generator)[:size].numpy()].tolist()
    mine = slice(rank * len(batch) // ranks, (rank + 1) * len(batch) // ranks)
    latents, captions = zip(*data.__getitems__(batch[mine]))
    # The mirrored latent half the time, where the cache has them (all examples or none).
    flip = torch.rand(len(batch), generator=generator) < 0.5 if "latent_flipped" in latents[0] else None
    drop = torch.rand(len(batch), generator=generator) < hp.caption_dropout if null_cond is not None else None
    picked = [pick_latent(latent, flip is not None and bool(flip[mine][i])) for i, latent in enumerate(latents)]
    x = {name: torch.stack([p[name] for p in picked]).to(device) for name in picked[0]}
    cond = {name: torch.stack([c[name] for c in captions]) for name in captions[0]}
    if drop is not None:
        for name, value in cond.items():
            value[drop[mine]] = null_cond[name]
    cond = {name: value.to(device, torch.float32) if value.is_floating_point() else value.to(device)
            for name, value in cond.items()}  # embeddings may be stored in bf16/fp16
    shape = (len(batch), *x["latent"].shape[1:])
    draws = {name: value[mine].to(device) for name, value in fam.draw_noise(schedule, shape, generator, hp).items()}
    return x, cond, draws


def pick_latent(item: dict[str, torch.Tensor], flip: bool) -> dict[str, torch.Tensor]:
    """The latent and how its image was cut; the mirrored variant when drawn and cached."""
    if flip and "latent_flipped" in item:
        return {"latent": item["latent_flipped"], "original_size": item["original_size"],
                "crop_top_left": item["crop_top_left_flipped"]}
    return {"latent": item["latent"], "original_size": item["original_size"], "crop_top_left": item["crop_top_left"]}


def tensorboard_dir(hp: TrainConfig, run_key: str) -> Path | None:
    if hp.tensorboard_dir == "":
        return None
    return Path(hp.tensorboard_dir or cache_root() / "tensorboard") / run_key[:16]


def checkpoint_steps(hp: TrainConfig) -> list[int]:
    """The steps a run stores weights and a checkpoint at: every `checkpoint_every`, and the last."""
    return sorted({*range(hp.checkpoint_every, hp.steps + 1, hp.checkpoint_every), hp.steps})


def checkpoint_key(run_key: str, step: int) -> str:
    return content_key("checkpoint", run_key, step)


def save_checkpoint(store, run_key, step, hp, fam, state, rows):
    """Store the step's weights (and EMA weights), then its checkpoint; returns the weight refs."""
    key = checkpoint_key(run_key, step)
    weights = store.put("weights", key, export_weights(fam, state.model, hp.method), "safetensors")
    ema_weights = None
    if state.ema is not None:
        state.ema.store(state.params)
        state.ema.copy_to(state.params)
        ema_weights = store.put("weights", content_key("ema", key), export_weights(fam, state.model, hp.method),
                                "safetensors")
        state.ema.restore(state.params)
    # The batch generator's state, and torch's global one (LoHa/LoKr's rank and module dropout draw from it).
    tensors = {"rng": state.generator.get_state(), "torch_rng": torch.get_rng_state()}
    # The metrics so far, less their wall-clock times: a checkpoint is the same bytes whichever run
    # (killed, resumed or not) reached it. The final metrics object keeps this run's times.
    meta = {"step": str(step), "metrics": json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows])}
    for name, obj in state.stateful().items():
        if obj is not None:
            named, meta[name] = flatten(obj.state_dict(), name)
            tensors |= named
    store.put_tensors("checkpoints", key, tensors, metadata=meta)  # after the weights: marks the step done
    return weights, ema_weights


def resume(store, run_key, hp, fam, state) -> tuple[int, dict, dict, list]:
    """Load the latest step whose checkpoint is intact, with the weights of it and of every step
    before it (`loraflow gc` keeps only a run's final checkpoint, and every step's weights).

    Returns that step (0 if none), the stored weights and EMA weights of every step up to it, and
    the metrics rows up to it."""
    found, resumable = {}, None
    for step in checkpoint_steps(hp):
        key = checkpoint_key(run_key, step)
        weights = store.find("weights", key, "safetensors")
        ema = store.find("weights", content_key("ema", key), "safetensors") if state.ema is not None else None
        if not (weights and (ema or state.ema is None)):
            break
        found[step] = (weights, ema)
        ckpt = store.find("checkpoints", key, "safetensors")
        if ckpt:
            resumable = step, ckpt
    if resumable is None:
        return 0, {}, {}, []
    step, ckpt = resumable
    found = {s: v for s, v in found.items() if s <= step}
    weights, _ = found[step]
    import_weights(fam, state.model, hp.method, store.read(weights))
    data = store.read(ckpt)
    tensors, meta = load_safetensors(data), safetensors_metadata(data)
    for name, obj in state.stateful().items():
        if obj is not None:
            obj.load_state_dict(unflatten(meta[name], tensors))
    if state.ema is not None:
        state.ema.to(state.params[0].device)
    state.generator.set_state(tensors["rng"])
    torch.set_rng_state(tensors["torch_rng"])
    ema_steps = {s: e for s, (_, e) in found.items() if e is not None}
    return step, {s: w for s, (w, _) in found.items()}, ema_steps, json.loads(meta["metrics"])


# --- data-parallel ranks under accelerate launch --------------------------------------------------

def launch(job: TrainJob, logger: logging.Logger | logging.LoggerAdapter, progress: OnStep | None = None) -> Weights:
    """`accelerate launch` of `job.hp.processes` ranks of this module; their log lines are relayed
    to `logger` as they come, and rank 0's result is returned."""
    with tempfile.TemporaryDirectory(prefix="loraflow-train-") as tmp:  # mode 0700: may hold store credentials
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(job.model_dump_json())
        env = dict(os.environ)
        if not env.get("OMP_NUM_THREADS", "x").strip():
            del env["OMP_NUM_THREADS"]  # set but empty: accelerate's launcher fails parsing it (int(""))
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"  # gloo between CPU processes
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", str(job.hp.processes), "--num_machines", "1",
                   "--mixed_precision", job.hp.mixed_precision, "--dynamo_backend", "no", "--main_process_port", "0",
                   "-m", "loraflow.training", str(job_file), str(result_file)]
        logger.info("training on %d processes: %s", job.hp.processes, " ".join(command[2:]))
        tail: deque[str] = deque(maxlen=40)
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=die_with_parent) as proc:
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                if line.startswith(RELAYED):
                    logger.info("%s", line[len(RELAYED):])
                    if progress and (step := STEP_LINE.match(line[len(RELAYED):])):
                        progress(int(step.group(1)))
        if proc.returncode != 0 or not result_file.exists():
            raise RuntimeError(f"train: the {job.hp.processes} training processes failed "
                               f"(exit code {proc.returncode}):\n" + "\n".join(tail))
        return Weights.model_validate_json(result_file.read_text())


RELAYED = "loraflow| "  # rank 0's log lines, as the launching task relays them
STEP_LINE = re.compile(r"step (\d+)/\d+")  # a progress or checkpoint line


def main(job_file: str, result_file: str) -> None:
    """One rank: the loop on its share of every batch; rank 0 writes the result."""
    return_freed_memory()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(RELAYED + "%(message)s"))
    logger = logging.getLogger("loraflow.training")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    job = TrainJob.model_validate_json(Path(job_file).read_text())
    accelerator = Accelerator(mixed_precision=job.hp.mixed_precision)
    weights = run(job, accelerator, logger)
    if accelerator.is_main_process:
        Path(result_file).write_text(weights.model_dump_json())
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
