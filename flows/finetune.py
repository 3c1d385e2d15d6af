"""The fine-tuning flow: five cached tasks wired by the manifests they hand each other."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import deployment, flow_run

from loraflow.config import RunConfig
from loraflow.dataset import load_dataset, read_sample_prompts
from loraflow.manifests import Example
from loraflow.models import check_resolution, resolve_model
from loraflow.remote import storage_options
from loraflow.report import Report, StageRunner
from loraflow.store import Store
from tasks import build_latent_cache, encode_prompts, null_embedding, sample, train


@flow(name="finetune")
def finetune(cfg: RunConfig = RunConfig()) -> Report:
    logger = get_run_logger()
    cfg = with_deployment_defaults(cfg)
    # Inputs are read and checked once, before any task runs: a bad file fails the run here.
    options = storage_options(cfg.storage_options, cfg.storage_secret)
    store = Store(cfg.store, options)
    model = resolve_model(cfg.model, options)
    check_resolution(model, cfg.dataset.resolution)
    images = load_dataset(cfg.dataset, options)
    sample_prompts = read_sample_prompts(cfg.sample, options)
    if not sample_prompts:
        logger.warning("no sample prompts: the run trains but makes no samples")

    report = Report(flow_run_id=str(flow_run.get_id()), store=store.url)
    run = StageRunner(store, report)
    text = dict(family=model.family, text_encoder=model.text_encoder, settings=cfg.encoder, store=store)

    # Lists go to tasks in content order, so renaming or reordering files changes no cache key.
    captions = run(encode_prompts, role="captions", prompts=sorted({i.caption for i in images}), **text)
    prompts = run(encode_prompts, role="sample prompts", prompts=sample_prompts, **text) if sample_prompts else None
    null = run(null_embedding, **text) if sample_prompts or cfg.train.caption_dropout > 0 else None
    latents = run(build_latent_cache, images=sorted(images, key=lambda i: i.sha256), family=model.family, vae=model.vae,
                  resolution=cfg.dataset.resolution, center_crop=cfg.dataset.center_crop,
                  flip=cfg.dataset.flip, store=store, batch_size=cfg.dataset.encode_batch_size)
    examples = sorted((Example(image=i.name, latent=latents.items[i.sha256], caption=captions.items[i.caption])
                       for i in images), key=lambda e: (e.latent.key, e.caption.key))  # by content, not name
    weights = run(train, family=model.family, denoiser=model.denoiser, examples=examples,
                  null=null if cfg.train.caption_dropout > 0 else None, hp=cfg.train, store=store)
    report.weights = store.url_of(weights.final.path)
    if prompts:
        samples = run(sample, family=model.family, denoiser=model.denoiser, vae=model.vae, weights=weights,
                      prompts=prompts, null=null, settings=cfg.sample.sampler(),
                      resolution=cfg.dataset.resolution, store=store)
        report.samples = [store.url_of(s.image.path) for s in samples.images]

    store.write_atomic(f"reports/{report.flow_run_id}.json", report.model_dump_json(indent=2).encode())
    logger.info("run report:\n%s", report.table())
    create_markdown_artifact(key="loraflow-run-report", markdown=report.markdown(),
                             description="loraflow: per-task cache state, items computed and reused")
    return report


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
