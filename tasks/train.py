"""train: LoRA or full fine-tuning of the denoiser on cached latents and caption embeddings.

It never loads the text encoder or the VAE: it reads only the objects its upstream tasks handed
it. The loop itself, its checkpoints and its resume are in `loraflow.training`.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from loraflow.config import TrainConfig
from loraflow.families import get_family
from loraflow.manifests import NullEmbedding, Weights
from loraflow.models import Component
from loraflow.optim import LENGTH_DEPENDENT
from loraflow.hashing import content_key
from loraflow.store import ListRef, Store, planned
from loraflow.training import TrainJob, checkpoint_key, checkpoint_steps
from loraflow.training import train as train_loop
from loraflow.ui import TrainProgress
from tasks.caching import ContentKey
from tasks.options import stage

# Key: base denoiser fingerprint, the (latent, caption embedding) pairs (the list's identity), the null embedding when
# caption dropout uses it, hyperparameters and seed (in `hp`).
CACHE_KEY = ContentKey("family", "denoiser", "examples", "null", "hp")


def run_key(family: str, denoiser: Component, examples: ListRef, null: NullEmbedding | None, hp: TrainConfig) -> str:
    """Where the run's checkpoints live: the training inputs minus the checkpoint spacing and,
    unless the LR schedule depends on it, the run length. A re-run with the same inputs, or one
    asked to train longer, resumes from them."""
    same_run = hp.model_copy(update={"checkpoint_every": 1} | ({} if hp.lr_scheduler in LENGTH_DEPENDENT else {"steps": 0}))
    return CACHE_KEY.key_for("train", dict(family=family, denoiser=denoiser, examples=examples, null=null, hp=same_run))


def predict(family: str, denoiser: Component, examples: ListRef, null: NullEmbedding | None, hp: TrainConfig,
            store: Store) -> Weights:
    """What the task would return, by key (for `loraflow plan`)."""
    key = run_key(family, denoiser, examples, null, hp)
    steps = {s: planned("weights", checkpoint_key(key, s), "safetensors") for s in checkpoint_steps(hp)}
    ema = {s: planned("weights", content_key("ema", ref.key), "safetensors") for s, ref in steps.items()} if hp.ema_decay else {}
    return Weights(method=hp.method, final_step=hp.steps, steps=steps, ema=ema)


@task(**stage("train"), task_run_name="train", cache_policy=CACHE_KEY, result_serializer="json")
def train(family: str, denoiser: Component, examples: ListRef, null: NullEmbedding | None,
          hp: TrainConfig, store: Store) -> Weights:
    """`examples` is the stored table of every training example (`Examples`: a latent and a caption embedding each)."""
    get_family(family).check_train(hp)
    job = TrainJob(family=family, denoiser=denoiser, examples=examples, null=null, hp=hp,
                   run_key=run_key(family, denoiser, examples, null, hp),
                   store_url=store.url, storage_options=store.storage_options)
    return train_loop(job, get_run_logger(), TrainProgress(hp.steps))
