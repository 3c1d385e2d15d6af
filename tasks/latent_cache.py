"""build-latent-cache: one latent per image, encoding only images not already in the store."""

from __future__ import annotations

from accelerate import PartialState
from prefect import get_run_logger, task

from loraflow.dataset import DatasetError, ImageItem, read_image, to_pixels
from loraflow.families import get_family
from loraflow.hashing import content_key, sha256_bytes
from loraflow.manifests import Latents
from loraflow.models import Component
from loraflow.store import Store
from tasks.caching import ContentKey

# Key: VAE fingerprint, image bytes (sha256), resolution / crop / flip settings.
CACHE_KEY = ContentKey("family", "vae", "images", "resolution", "center_crop", "flip")


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
        model = fam.load_vae(vae.path, PartialState().device)
        for image, key in todo:  # one at a time: an object's bytes depend on its key alone
            data = read_image(image.url, store.storage_options)
            if sha256_bytes(data) != image.sha256:
                raise DatasetError(f"dataset: {image.url} changed while the run was reading it")
            pixels, tensors = to_pixels(data, resolution, center_crop)
            tensors["latent"] = fam.encode_images(model, pixels[None])[0]
            if flip:
                mirrored, cut = to_pixels(data, resolution, center_crop, flip=True)
                tensors["latent_flipped"] = fam.encode_images(model, mirrored[None])[0]
                tensors["crop_top_left_flipped"] = cut["crop_top_left"]
            items[image.sha256] = store.put_tensors("latents", key, tensors, metadata={"image": image.name})
    logger.info("%d latent(s) encoded, %d reused", len(todo), len(items) - len(todo))
    return Latents(items=items, computed=len(todo), reused=len(items) - len(todo))
