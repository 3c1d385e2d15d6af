"""train: LoRA or full fine-tuning of the denoiser on cached latents and caption embeddings.

It never loads the text encoder or the VAE: it reads only the objects its upstream tasks handed
it. Every `checkpoint_every` steps it stores the exported weights (and their EMA) and a checkpoint
(optimizer, LR schedule, EMA and RNG state, the metrics so far); a run with the same cache key
resumes from the latest intact one, bitwise as if it had never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from prefect import get_run_logger, task
from safetensors.torch import load as load_safetensors

from loraflow.builtin import cache_root
from loraflow.config import TrainConfig
from loraflow.families import get_family, pick_device
from loraflow.hashing import content_key
from loraflow.manifests import Example, NullEmbedding, Weights
from loraflow.metrics import TrainingLog
from loraflow.models import Component
from loraflow.optim import LENGTH_DEPENDENT, flatten, make_ema, make_optimizer, make_schedule, unflatten
from loraflow.store import ListRef, Store, safetensors_metadata
from loraflow.training_data import StoreExamples
from loraflow.weights import export_weights, import_weights
from tasks.caching import ContentKey

# Key: base denoiser fingerprint, the (latent, caption embedding) pairs (the list's identity), the null embedding when
# caption dropout uses it, hyperparameters and seed (in `hp`).
CACHE_KEY = ContentKey("family", "denoiser", "examples", "null", "hp")


@task(name="train", task_run_name="train", cache_policy=CACHE_KEY, result_serializer="json")
def train(family: str, denoiser: Component, examples: ListRef, null: NullEmbedding | None,
          hp: TrainConfig, store: Store) -> Weights:
    """`examples` is the stored list of every training `Example` (a latent and a caption embedding)."""
    logger = get_run_logger()
    # Checkpoints live under the training inputs minus the checkpoint spacing and, unless the LR
    # schedule depends on it, the run length: a re-run with the same inputs, or one asked to train
    # longer, resumes from them.
    same_run = hp.model_copy(update={"checkpoint_every": 1} | ({} if hp.lr_scheduler in LENGTH_DEPENDENT else {"steps": 0}))
    run_key = CACHE_KEY.key_for("train", dict(family=family, denoiser=denoiser, examples=examples, null=null, hp=same_run))
    fam = get_family(family)
    fam.check_train(hp)

    # Data: everything comes from the store by the refs upstream handed us, read as steps need it.
    listed = store.read_list(examples, Example)
    data = StoreExamples(store, listed, budget_bytes=hp.data_cache_mb * 2**20)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, e in enumerate(listed):
        by_size.setdefault(e.size, []).append(i)
    buckets = [by_size[size] for size in sorted(by_size)]  # example indices per bucket
    if hp.caption_dropout > 0 and null is None:
        raise ValueError("train.caption_dropout > 0 needs the null embedding")
    null_cond = store.read_tensors(null.embedding) if hp.caption_dropout > 0 else None

    # Model, optimizer, schedule and EMA, on accelerate's pick of device (a GPU when there is one).
    device = pick_device()
    torch.manual_seed(hp.seed)
    model = fam.load_denoiser(denoiser.path)
    if hp.method == "lora":
        model.requires_grad_(False)
        fam.add_lora(model, hp)
    if hp.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(hp, params, device)
    lr_schedule = make_schedule(hp, optimizer)
    ema = make_ema(hp, params)
    schedule = fam.load_noise_schedule(denoiser.path)
    generator = torch.Generator().manual_seed(hp.seed)
    state = State(model, params, optimizer, lr_schedule, ema, generator)

    start, steps, ema_steps, rows = resume(store, run_key, hp, fam, state)
    if start:
        logger.info("resuming from step %d (checkpoint %s)", start, checkpoint_key(run_key, start)[:12])
    log = TrainingLog(logger, tensorboard_dir(hp, run_key), start, hp.steps, hp.log_every, rows)

    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=hp.mixed_precision == "bf16")
    for step in range(start, hp.steps):
        # One optimizer step over `gradient_accumulation_steps` batches.
        losses, images = [], 0
        for _ in range(hp.gradient_accumulation_steps):
            x, cond = next_batch(data, buckets, generator, null_cond, hp, device)
            images += len(x["latent"])  # fewer than batch_size from a bucket smaller than it
            with autocast:
                loss = fam.training_loss(model, schedule, x, cond, generator, hp)
            (loss / hp.gradient_accumulation_steps).backward()
            losses.append(loss.detach())
        if hp.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        done = step + 1
        log.step(done, torch.stack(losses).mean().item(), lr, grad_norm.item(), images)
        if done % hp.checkpoint_every == 0 or done == hp.steps:
            log.flush()
            steps[done], ema_weights = save_checkpoint(store, run_key, done, hp, fam, state, log.rows)
            if ema_weights:
                ema_steps[done] = ema_weights
            logger.info("step %d/%d: checkpoint stored", done, hp.steps)
    log.close()
    data.close()
    metrics = store.put_json("metrics", checkpoint_key(run_key, hp.steps), log.rows)
    return Weights(method=hp.method, final_step=hp.steps, steps=steps, ema=ema_steps, metrics=metrics,
                   computed=hp.steps - start, reused=start)


class State:
    """Everything a checkpoint saves and a resume restores, besides the step."""

    def __init__(self, model, params, optimizer, lr_schedule, ema, generator):
        self.model, self.params, self.optimizer = model, params, optimizer
        self.lr_schedule, self.ema, self.generator = lr_schedule, ema, generator

    def stateful(self) -> dict:
        return {"optimizer": self.optimizer, "lr_schedule": self.lr_schedule, "ema": self.ema}


def next_batch(data, buckets, generator, null_cond, hp, device):
    """A batch of `hp.batch_size` examples drawn from the generator: latents and caption tensors.
    With several buckets, a bucket is drawn first (in proportion to its examples), then examples
    from it only; a bucket smaller than the batch size gives a smaller batch."""
    if len(buckets) == 1:
        batch = torch.randperm(len(data), generator=generator)[: hp.batch_size].tolist()
    else:
        counts = torch.tensor([len(b) for b in buckets], dtype=torch.float64)
        members = buckets[torch.multinomial(counts, 1, generator=generator).item()]
        batch = [members[i] for i in torch.randperm(len(members), generator=generator)[: hp.batch_size].tolist()]
    latents, captions = zip(*data.__getitems__(batch))
    picked = [pick_latent(latent, generator) for latent in latents]
    x = {name: torch.stack([p[name] for p in picked]).to(device) for name in picked[0]}
    cond = {name: torch.stack([c[name] for c in captions]) for name in captions[0]}
    if null_cond is not None:
        drop = torch.rand(len(batch), generator=generator) < hp.caption_dropout
        for name, value in cond.items():
            value[drop] = null_cond[name]
    cond = {name: value.to(device, torch.float32) if value.is_floating_point() else value.to(device)
            for name, value in cond.items()}  # embeddings may be stored in bf16/fp16
    return x, cond


def pick_latent(item: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The latent and how its image was cut; the mirrored variant half the time when cached."""
    picked = {"latent": item["latent"], "original_size": item["original_size"], "crop_top_left": item["crop_top_left"]}
    if "latent_flipped" in item and torch.rand((), generator=generator) < 0.5:
        picked |= {"latent": item["latent_flipped"], "crop_top_left": item["crop_top_left_flipped"]}
    return picked


def tensorboard_dir(hp: TrainConfig, run_key: str) -> Path | None:
    if hp.tensorboard_dir == "":
        return None
    return Path(hp.tensorboard_dir or cache_root() / "tensorboard") / run_key[:16]


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
    tensors = {"rng": state.generator.get_state()}
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
    """Load the latest step whose weights and checkpoint are all intact (and every one before it).

    Returns that step (0 if none), the stored weights and EMA weights of every step up to it, and
    the metrics rows up to it."""
    saved = sorted({*range(hp.checkpoint_every, hp.steps + 1, hp.checkpoint_every), hp.steps})
    found = {}
    for step in saved:
        key = checkpoint_key(run_key, step)
        weights, ckpt = store.find("weights", key, "safetensors"), store.find("checkpoints", key, "safetensors")
        ema = store.find("weights", content_key("ema", key), "safetensors") if state.ema is not None else None
        if not (weights and ckpt and (ema or state.ema is None)):
            break
        found[step] = (weights, ckpt, ema)
    if not found:
        return 0, {}, {}, []
    step = max(found)
    weights, ckpt, _ = found[step]
    import_weights(fam, state.model, hp.method, store.read(weights))
    data = store.read(ckpt)
    tensors, meta = load_safetensors(data), safetensors_metadata(data)
    for name, obj in state.stateful().items():
        if obj is not None:
            obj.load_state_dict(unflatten(meta[name], tensors))
    if state.ema is not None:
        state.ema.to(state.params[0].device)
    state.generator.set_state(tensors["rng"])
    ema_steps = {s: e for s, (_, _, e) in found.items() if e is not None}
    return step, {s: w for s, (w, _, _) in found.items()}, ema_steps, json.loads(meta["metrics"])
