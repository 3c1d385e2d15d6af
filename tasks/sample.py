"""sample: images for each sample prompt from the final weights and chosen checkpoints.

Classifier-free guidance uses the null embedding. Per (prompt, step, index) item only missing
images are made. Prompts arrive as embeddings encoded at flow start, so editing the prompt file
while a run trains changes the next run only.
"""

from __future__ import annotations

import io

import torch
from PIL import PngImagePlugin
from prefect import get_run_logger, task

from loraflow.config import SamplerSettings
from loraflow.families import get_family, pick_device
from loraflow.hashing import content_key
from loraflow.manifests import Embeddings, NullEmbedding, SampleImage, Samples, Weights
from loraflow.models import Component
from loraflow.progress import Progress
from loraflow.store import Store
from loraflow.weights import apply_weights
from tasks.caching import ContentKey
from tasks.options import stage

# Key: base model (denoiser and VAE), trained weights, prompt and null embeddings, sampler settings.
CACHE_KEY = ContentKey("family", "denoiser", "vae", "weights", "prompts", "null", "settings", "resolution")


def predict(**inputs) -> Samples:
    """Nothing downstream reads the samples' keys: `loraflow plan` needs only the stage's own key."""
    return Samples(images=[])


@task(**stage("sample"), task_run_name="sample", cache_policy=CACHE_KEY, result_serializer="json")
def sample(family: str, denoiser: Component, vae: Component, weights: Weights, prompts: Embeddings,
           null: NullEmbedding, settings: SamplerSettings, resolution: int, store: Store) -> Samples:
    logger = get_run_logger()
    steps = [weights.final_step] + [s for s in settings.checkpoints if s != weights.final_step]
    for s in steps:
        if s not in weights.steps:
            raise ValueError(f"sample.checkpoints: no checkpoint at step {s}; stored steps: {sorted(weights.steps)}")

    images, todo = [], {}
    for step in steps:
        for prompt, embedding in prompts.items.items():
            for index in range(settings.images_per_prompt):
                key = content_key("sample", family, denoiser, vae, weights.steps[step], embedding, null,
                                  settings.steps, settings.guidance_scale, settings.seed, index, resolution,
                                  settings.guidance_embedding)
                ref = store.find("samples", key, "png")
                item = SampleImage(prompt=prompt, step=step, index=index, image=ref) if ref else None
                images.append(item)
                if not ref:
                    todo.setdefault(step, []).append((len(images) - 1, prompt, embedding, index, key))

    made = sum(len(jobs) for jobs in todo.values())
    if todo:
        fam = get_family(family)
        device = pick_device()
        vae_model = fam.load_vae(vae.path, device)
        null_cond = {k: v.to(device) for k, v in store.read_tensors(null.embedding).items()}
        progress = Progress(logger, "samples", made, " made")
        for step, jobs in todo.items():
            pipe = fam.pipeline(denoiser.path, fam.load_denoiser(denoiser.path).eval(), vae_model)
            apply_weights(pipe, fam, weights.method, store.read(weights.steps[step]))
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            for slot, prompt, embedding, index, key in jobs:
                generator = torch.Generator().manual_seed(settings.seed + index)
                cond = {k: v.to(device) for k, v in store.read_tensors(embedding).items()}
                image = fam.generate(pipe, cond, null_cond, settings, resolution, generator)
                ref = store.put("samples", key, png_bytes(image, prompt, step), "png")
                images[slot] = SampleImage(prompt=prompt, step=step, index=index, image=ref)
                progress.advance()
    logger.info("%d image(s) made, %d reused", made, len(images) - made)
    return Samples(images=images, computed=made, reused=len(images) - made)


def png_bytes(image, prompt: str, step: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("step", str(step))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
