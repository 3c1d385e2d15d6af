"""The fine-tuning flow: five cached tasks wired by the manifests they hand each other.

The latent cache and caption encoding run as one task per shard on the configured task runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import deployment, flow_run

from loraflow.buckets import cut_size, plan_buckets
from loraflow.config import RunConfig
from loraflow.dataset import Images, load_dataset, read_sample_prompts
from loraflow.families import get_family, pick_device
from loraflow.live import live_run
from loraflow.metrics import import_wandb
from loraflow.manifests import Embeddings, Examples, Latents, Samples, Weights, digest_array, packed
from loraflow.models import check_resolution, resolve_model
from loraflow.precision import check_precision
from loraflow.remote import storage_options
from loraflow.run_logs import send_to_runs
from loraflow.hashing import sha256_bytes
from loraflow.host_memory import return_freed_memory
from loraflow.report import Report, SampleRow, StageRunner
from loraflow.shards import store_shards
from loraflow.store import ListRef, Store
from loraflow.ui import publish
from tasks import build_latent_cache, encode_prompts, null_embedding, sample, train


@flow(name="finetune")
def finetune(cfg: RunConfig = RunConfig()) -> Report:
    send_to_runs()  # loraflow's own lines (model build, dataset scan) in this run's logs too
    return_freed_memory()  # freed tensors go back to the system, not into the next stage's peak
    logger = get_run_logger()
    cfg = with_deployment_defaults(cfg)
    inputs = read_inputs(cfg, logger)
    store = inputs.store
    report = Report(flow_run_id=str(flow_run.get_id()), store=store.url, family=cfg.model.family,
                    method=cfg.train.method, final_step=cfg.train.steps, started=now())
    with live_run(store, report.flow_run_id):  # `loraflow gc` deletes nothing while this runs
        out = stages(cfg, inputs, StageRunner(store, report, tags=cfg.runner.tags))
        finish(report, out, store, logger)
    return report


def finish(report: Report, out: Outputs, store: Store, logger) -> None:
    """Store the run report (what `loraflow ls`, `show`, `plan` and `gc` read) and show it."""
    report.weights = store.url_of(out.weights.final.path)
    report.ema_weights = store.url_of(out.weights.ema[out.weights.final_step].path) if out.weights.ema else None
    report.metrics = store.url_of(out.weights.metrics.path) if out.weights.metrics else None
    if out.samples:
        report.samples = [store.url_of(s.image.path) for s in out.samples.images]
        report.sample_images = [SampleRow(prompt=s.prompt, step=s.step, index=s.index, url=store.url_of(s.image.path))
                                for s in out.samples.images]
    report.finished = now()
    store.write_atomic(f"reports/{report.flow_run_id}.json", report.model_dump_json(indent=2).encode())
    logger.info("run report:\n%s", report.table())
    create_markdown_artifact(key="loraflow-run-report", markdown=report.markdown(),
                             description="loraflow: per-task cache state, items computed and reused")
    publish(report, out.weights, out.samples, store)  # the table, weights link, loss curve and sample grid


@dataclass
class Inputs:
    """What a run reads and checks before any task runs: a bad file fails the run here."""

    store: Store
    model: Any  # loraflow.models.ResolvedModel: each component's local path and fingerprint
    buckets: list | None
    images: Images | None
    sample_prompts: list[str]

    def take_images(self) -> Images:
        """The dataset's columns, handed over: from now on only the caller holds them (and lets
        them go before training, whose memory then does not grow with the dataset)."""
        images, self.images = self.images, None
        return images


@dataclass
class Outputs:
    weights: Weights
    samples: Samples | None


def read_inputs(cfg: RunConfig, logger) -> Inputs:
    options = storage_options(cfg.storage_options, cfg.storage_secret)
    store = Store(cfg.store, options)
    fam = get_family(cfg.model.family)
    fam.check_train(cfg.train)
    if cfg.train.wandb_project:
        import_wandb()  # wandb missing: one error naming train.wandb_project, before any task runs
    check_precision(cfg.train, pick_device())
    model = resolve_model(cfg.model, options)
    check_resolution(model, cfg.dataset.resolution)
    buckets = plan_buckets(cfg.dataset, fam.buckets_by_default, fam.resolution_multiple(model.vae.path))
    images = load_dataset(cfg.dataset, options)
    sample_prompts = read_sample_prompts(cfg.sample, options)
    if not sample_prompts:
        logger.warning("no sample prompts: the run trains but makes no samples")
    return Inputs(store, model, buckets, images, sample_prompts)


def stages(cfg: RunConfig, inputs: Inputs, run: StageRunner) -> Outputs:
    """The DAG: each task handed the manifests of those before it. `run` runs a task (or, for
    `loraflow plan`, looks its record up and says what it would return)."""
    store, model, images = inputs.store, inputs.model, inputs.take_images()
    text = dict(family=model.family, text_encoder=model.text_encoder, settings=cfg.encoder, store=store)
    vae = dict(family=model.family, vae=model.vae, resolution=cfg.dataset.resolution,
               center_crop=cfg.dataset.center_crop, flip=cfg.dataset.flip, store=store,
               batch_size=cfg.dataset.encode_batch_size, buckets=inputs.buckets,
               helpers=cfg.dataset.helpers)

    # Captions and images are cut into content-defined shards, each stored as one list and handed to
    # its task by reference; lists are in content order, so renaming or reordering files changes no key.
    size = cfg.dataset.shard_size
    caption_shards = store_shards(store, images.captions, lambda c: sha256_bytes(c.encode()), size)
    by_content = np.argsort(digest_array(images.sha256), kind="stable")
    image_shards = store_shards(store, by_content, images.sha, size, stored=images.items)
    caption_parts, latent_parts = run.map(  # on the task runner: threads here, or Dask workers
        cfg.runner,
        [(encode_prompts, dict(prompts=ref, role=f"captions {label}", **text)) for label, ref in caption_shards.items()],
        [(build_latent_cache, dict(images=ref, shard=label, **vae)) for label, ref in image_shards.items()])
    prompts = (run(encode_prompts, role="sample prompts", prompts=store.put_list(inputs.sample_prompts), **text)
               if inputs.sample_prompts else None)
    null = run(null_embedding, **text) if inputs.sample_prompts or cfg.train.caption_dropout > 0 else None

    examples = store_examples(store, images, caption_parts, latent_parts, cfg.dataset.resolution, inputs.buckets)
    # Training needs none of what was held per image to get here: the dataset's columns, the
    # shards' manifests, the store's listings. Let them go (training collects what Prefect's
    # states still hold of them in reference cycles, and gives the memory back to the system).
    del images, by_content, caption_parts, latent_parts
    store.forget_listings()
    weights = run(train, family=model.family, denoiser=model.denoiser, examples=examples,
                  null=null if cfg.train.caption_dropout > 0 else None, hp=cfg.train, store=store)
    samples = None
    if prompts:
        samples = run(sample, family=model.family, denoiser=model.denoiser, vae=model.vae, weights=weights,
                      prompts=prompts, null=null, settings=cfg.sample.sampler(),
                      resolution=cfg.dataset.resolution, store=store)
    return Outputs(weights, samples)


def store_examples(store: Store, images: Images, caption_parts: list[Embeddings], latent_parts: list[Latents],
                   resolution: int, buckets: list | None) -> ListRef:
    """The training examples, one per image, joined by content (its latent, its caption's
    embedding) in numpy columns, without a Python object per image, and stored as one table."""
    # Each image's latent, found by the image's sha256 among those of every shard. (One full-length
    # column at a time: at 1M images each is 64 MB.)
    shard_images = digest_array(packed(part.images for part in latent_parts))
    order = np.argsort(shard_images)
    image_sha256 = digest_array(images.sha256)
    found = order[np.searchsorted(shard_images, image_sha256, sorter=order).clip(max=len(order) - 1)]
    if missing := np.flatnonzero(shard_images[found] != image_sha256)[:1].tolist():
        raise RuntimeError(f"no latent was made for {images.names[missing[0]]}")
    del shard_images, image_sha256, order
    latents = digest_array(packed(part.latents for part in latent_parts))[found]
    checksums = np.concatenate([part.checksum_array() for part in latent_parts])[found]
    # Each distinct caption's embedding, found by its text.
    where = {caption: i for i, caption in enumerate(images.captions)}
    captions, caption_sha256 = np.zeros(len(where), "S64"), np.zeros(len(where), "S64")
    for part in caption_parts:
        at = [where[prompt] for prompt in part.prompts]
        captions[at], caption_sha256[at] = part.columns()
    del where
    # The size each image is cut to, worked out once per distinct image size.
    shapes, which = np.unique(np.array([images.heights, images.widths]).T, axis=0, return_inverse=True)
    cuts = np.array([cut_size(int(h), int(w), resolution, buckets) for h, w in shapes]).reshape(-1, 2)
    return Examples.of(latents, checksums, captions, caption_sha256,
                       np.array(images.caption, dtype=np.int32), cuts[which.ravel()]).stored(store)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def with_deployment_defaults(cfg: RunConfig) -> RunConfig:
    """Under a deployment, the config fields a run does not set keep the deployment's values.

    Prefect merges run parameters into a deployment's at the top level only, so
    `--param cfg='{"train": {"steps": 50}}'` would otherwise reset every other field to its
    default. Pydantic remembers which fields were given; those override the deployment's config.
    """
    if not deployment.id:
        return cfg
    with get_client(sync_client=True) as client:
        defaults = client.read_deployment(deployment.id).parameters.get("cfg")
    if not defaults:
        return cfg
    return RunConfig.model_validate(_merge(defaults, cfg.model_dump(exclude_unset=True)))


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(name), dict)
        merged[name] = _merge(base[name], value) if both_dicts else value
    return merged
