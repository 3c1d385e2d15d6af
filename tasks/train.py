"""train: LoRA or full fine-tuning of the denoiser on cached latents and caption embeddings.

It never loads the text encoder or the VAE: it reads only the objects its upstream tasks handed
it. Every `checkpoint_every` steps it stores the exported weights and a checkpoint (optimizer
state, RNG state, step); a run with the same cache key resumes from the latest intact one.
"""

from __future__ import annotations

import json

import torch
from prefect import get_run_logger, task
from safetensors.torch import load as load_safetensors

from loraflow.config import TrainConfig
from loraflow.families import get_family, pick_device
from loraflow.hashing import content_key
from loraflow.manifests import Example, NullEmbedding, Weights
from loraflow.models import Component
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
    # Checkpoints live under the training inputs minus the run length and checkpoint spacing: a re-run
    # with the same inputs, or one asked to train longer, resumes from them.
    same_run = hp.model_copy(update={"steps": 0, "checkpoint_every": 1})
    run_key = CACHE_KEY.key_for("train", dict(family=family, denoiser=denoiser, examples=examples, null=null, hp=same_run))
    fam = get_family(family)

    # Data: everything comes from the store by the refs upstream handed us, read as steps need it.
    data = StoreExamples(store, store.read_list(examples, Example), budget_bytes=hp.data_cache_mb * 2**20)
    if hp.caption_dropout > 0 and null is None:
        raise ValueError("train.caption_dropout > 0 needs the null embedding")
    null_cond = store.read_tensors(null.embedding) if hp.caption_dropout > 0 else None

    # Model and optimizer, on accelerate's pick of device (a GPU when there is one).
    device = pick_device()
    torch.manual_seed(hp.seed)
    model = fam.load_denoiser(denoiser.path)
    if hp.method == "lora":
        model.requires_grad_(False)
        fam.add_lora(model, hp.rank, hp.alpha)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate)
    schedule = fam.load_noise_schedule(denoiser.path)
    generator = torch.Generator().manual_seed(hp.seed)

    start, steps = resume(store, run_key, hp, fam, model, optimizer, generator)
    if start:
        logger.info("resuming from step %d (checkpoint %s)", start, checkpoint_key(run_key, start)[:12])

    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=hp.mixed_precision == "bf16")
    for step in range(start, hp.steps):
        batch = torch.randperm(len(data), generator=generator)[: hp.batch_size].tolist()
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
        with autocast:
            loss = fam.training_loss(model, schedule, x, cond, generator, hp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if done % hp.checkpoint_every == 0 or done == hp.steps:
            steps[done] = save_checkpoint(store, run_key, done, hp, fam, model, optimizer, generator)
            logger.info("step %d/%d loss %.4f: checkpoint stored", done, hp.steps, loss.item())
    data.close()
    return Weights(method=hp.method, final_step=hp.steps, steps=steps, computed=hp.steps - start, reused=start)


def pick_latent(item: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The latent and how its image was cut; the mirrored variant half the time when cached."""
    picked = {"latent": item["latent"], "original_size": item["original_size"], "crop_top_left": item["crop_top_left"]}
    if "latent_flipped" in item and torch.rand((), generator=generator) < 0.5:
        picked |= {"latent": item["latent_flipped"], "crop_top_left": item["crop_top_left_flipped"]}
    return picked


def checkpoint_key(run_key: str, step: int) -> str:
    return content_key("checkpoint", run_key, step)


def save_checkpoint(store, run_key, step, hp, fam, model, optimizer, generator):
    key = checkpoint_key(run_key, step)
    weights = store.put("weights", key, export_weights(fam, model, hp.method), "safetensors")
    state = optimizer.state_dict()
    tensors = {f"optimizer.{i}.{name}": value for i, s in state["state"].items() for name, value in s.items()}
    tensors["rng"] = generator.get_state()
    meta = {"step": str(step), "param_groups": json.dumps(state["param_groups"])}
    store.put_tensors("checkpoints", key, tensors, metadata=meta)  # after the weights: marks the step done
    return weights


def resume(store, run_key, hp, fam, model, optimizer, generator) -> tuple[int, dict]:
    """Load the latest step whose weights and checkpoint are both intact (and every one before it).

    Returns that step (0 if none) and the stored weights of every step up to it."""
    saved = sorted({*range(hp.checkpoint_every, hp.steps + 1, hp.checkpoint_every), hp.steps})
    found = {}
    for step in saved:
        key = checkpoint_key(run_key, step)
        weights, ckpt = store.find("weights", key, "safetensors"), store.find("checkpoints", key, "safetensors")
        if not (weights and ckpt):
            break
        found[step] = (weights, ckpt)
    if not found:
        return 0, {}
    step = max(found)
    weights, ckpt = found[step]
    import_weights(fam, model, hp.method, store.read(weights))
    data = store.read(ckpt)
    tensors, meta = load_safetensors(data), safetensors_metadata(data)
    state = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, field = name.split(".", 2)
            state["state"].setdefault(int(index), {})[field] = value
    optimizer.load_state_dict(state)
    generator.set_state(tensors["rng"])
    return step, {s: w for s, (w, _) in found.items()}

