"""build-latent-cache: one latent per image, encoding only images not already in the store."""

from __future__ import annotations

import torch
from prefect import get_run_logger, task

from loraflow.dataset import ImageItem, read_image, to_pixels
from loraflow.families import get_family
from loraflow.hashing import content_key
from loraflow.manifests import Latents
from loraflow.models import Component
from loraflow.store import Store
from tasks.caching import ContentKey

# Key: VAE fingerprint, image bytes (sha256), resolution / crop / flip settings.
CACHE_KEY = ContentKey("family", "vae", "images", "resolution", "center_crop", "flip")
BATCH = 8


def latent_key(family: str, vae: Component, image: ImageItem, resolution: int, center_crop: bool, flip: bool) -> str:
    return content_key("latent", family, vae, image, resolution, center_crop, flip)


@task(name="build-latent-cache", task_run_name="build-latent-cache", cache_policy=CACHE_KEY, result_serializer="json")
def build_latent_cache(images: list[ImageItem], family: str, vae: Component, resolution: int,
                       center_crop: bool, flip: bool, store: Store) -> Latents:
    logger = get_run_logger()
    items, todo = {}, []
    for image in {i.sha256: i for i in images}.values():
        key = latent_key(family, vae, image, resolution, center_crop, flip)
        ref = store.find("latents", key, "safetensors")
        if ref:
            items[image.sha256] = ref
        else:
            todo.append((image, key))
    if todo:
        fam = get_family(family)
        model = fam.load_vae(vae.path)
        for start in range(0, len(todo), BATCH):
            batch = todo[start : start + BATCH]
            data = [read_image(image.url) for image, _ in batch]
            latents = fam.encode_images(model, torch.stack([to_pixels(d, resolution, center_crop) for d in data]))
            if flip:
                mirrored = torch.stack([to_pixels(d, resolution, center_crop, flip=True) for d in data])
                flipped = fam.encode_images(model, mirrored)
            for n, (image, key) in enumerate(batch):
                tensors = {"latent": latents[n]} | ({"latent_flipped": flipped[n]} if flip else {})
                items[image.sha256] = store.put_tensors("latents", key, tensors, metadata={"image": image.name})
    logger.info("%d latent(s) encoded, %d reused", len(todo), len(items) - len(todo))
    return Latents(items=items, computed=len(todo), reused=len(items) - len(todo))
