"""build-latent-cache: one latent per image, encoding only images not already in the store.

Images are encoded in fixed-shape batches (`loraflow.batching`): an object's bytes depend on its
key and the batch size, never on which other images share its pass. The next batch is read and
decoded, and finished latents are written, in worker threads while the VAE runs.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import groupby

import torch
from prefect import get_run_logger, task

from loraflow.batching import GPU_IMAGE_BATCH, batch_size_for, chunks, io_threads, padded_pass, prefetched, worker_pool
from loraflow.buckets import Size, cut_size
from loraflow.dataset import DatasetError, ImageItem, read_image, to_pixels
from loraflow.families import get_family, loaded, pick_device
from loraflow.hashing import content_key, sha256_bytes
from loraflow.manifests import Latents
from loraflow.models import Component
from loraflow.progress import Progress
from loraflow.store import ListRef, ObjectRef, Store, planned
from tasks.caching import ContentKey
from tasks.options import stage

# Key: VAE fingerprint, the shard's image bytes (each image's sha256, through the list's identity),
# resolution / aspect-ratio buckets / crop / flip settings. Not the shard label or the batch size:
# they change how the work is cut, not what a latent is.
CACHE_KEY = ContentKey("family", "vae", "images", "resolution", "buckets", "center_crop", "flip")


def latent_key(family: str, vae: Component, image: ImageItem, size: int | Size, center_crop: bool, flip: bool) -> str:
    """A latent is named by what it is made of: the image's bytes, the size it was cut to (a
    bucket, or resolution²), crop and flip. Changing the buckets keeps the latents whose cut stays."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return content_key("latent", family, vae, image, size, center_crop, flip)


def latent_keys(images: dict[str, ImageItem], sizes: dict[str, Size], family: str, vae: Component,
                center_crop: bool, flip: bool) -> dict[str, str]:
    """{image sha256: its latent's key}."""
    return {sha: latent_key(family, vae, image, sizes[sha], center_crop, flip) for sha, image in images.items()}


def predict(images: ListRef, family: str, vae: Component, resolution: int, center_crop: bool, flip: bool,
            store: Store, shard: str = "1/1", batch_size: int | None = None, buckets: list[Size] | None = None) -> Latents:
    """What the task would return, by key (for `loraflow plan`)."""
    unique = {i.sha256: i for i in store.read_list(images, ImageItem)}
    sizes = {sha: cut_size(i.height, i.width, resolution, buckets) for sha, i in unique.items()}
    keys = latent_keys(unique, sizes, family, vae, center_crop, flip)
    return Latents.of({sha: planned("latents", key, "safetensors") for sha, key in keys.items()})


@dataclass
class Cut:
    """One image read, checked and cut to the VAE's input: pixels (and mirrored pixels when
    flipping) plus the tensors stored beside its latent (size and crop)."""

    pixels: torch.Tensor
    mirrored: torch.Tensor | None
    tensors: dict[str, torch.Tensor]


def cut_image(image: ImageItem, size: Size, center_crop: bool, flip: bool, store: Store) -> Cut:
    data = read_image(image.url, store.storage_options)
    if sha256_bytes(data) != image.sha256:
        raise DatasetError(f"dataset: {image.url} changed while the run was reading it")
    pixels, tensors = to_pixels(data, size, center_crop)
    mirrored = None
    if flip:
        mirrored, cut = to_pixels(data, size, center_crop, flip=True)
        tensors["crop_top_left_flipped"] = cut["crop_top_left"]
    return Cut(pixels, mirrored, tensors)


@task(**stage("build-latent-cache"), task_run_name="build-latent-cache[{shard}]", cache_policy=CACHE_KEY,
      result_serializer="json")
def build_latent_cache(images: ListRef, family: str, vae: Component, resolution: int, center_crop: bool,
                       flip: bool, store: Store, shard: str = "1/1", batch_size: int | None = None,
                       buckets: list[Size] | None = None) -> Latents:
    """One shard's latents: `images` is the shard's list of `ImageItem`s, stored; each is cut to
    its aspect-ratio bucket (`buckets`) or to resolution²."""
    logger = get_run_logger()
    unique = {i.sha256: i for i in store.read_list(images, ImageItem)}
    sizes = {sha: cut_size(i.height, i.width, resolution, buckets) for sha, i in unique.items()}
    keys = latent_keys(unique, sizes, family, vae, center_crop, flip)
    found = store.find_many("latents", list(keys.values()), "safetensors")
    items = {sha: found[key] for sha, key in keys.items() if key in found}
    # Batches of one size each (a bucket's images), in content order within it.
    todo = sorted(((unique[sha], key) for sha, key in keys.items() if key not in found),
                  key=lambda job: (sizes[job[0].sha256], job[1]))
    if todo:
        items.update(encode_latents(todo, sizes, family, vae, center_crop, flip, store, batch_size))
    logger.info("%d latent(s) encoded, %d reused", len(todo), len(items) - len(todo))
    latents = Latents.of(items, computed=len(todo), reused=len(items) - len(todo))
    store.vouch_for(latents.refs())
    return latents


def encode_latents(todo: list[tuple[ImageItem, str]], sizes: dict[str, Size], family: str, vae: Component,
                   center_crop: bool, flip: bool, store: Store, batch_size: int | None) -> dict[str, ObjectRef]:
    """Encode and store every (image, key) in `todo` (grouped by cut size); {image sha256: stored latent}."""
    fam = get_family(family)
    device = pick_device()
    model = loaded(fam.load_vae, vae.path, device)
    size = batch_size_for(batch_size, device, GPU_IMAGE_BATCH)

    def encode(pixels: list[torch.Tensor]) -> torch.Tensor:
        return fam.encode_images(model, torch.stack(pixels))

    stored: dict[str, ObjectRef] = {}
    writes: deque[Future] = deque()  # each batch's writes: {image sha256: stored latent}
    def load(job: tuple[ImageItem, str]) -> Cut:
        return cut_image(job[0], sizes[job[0].sha256], center_crop, flip, store)

    by_size = [list(group) for _, group in groupby(todo, key=lambda job: sizes[job[0].sha256])]
    progress = Progress(get_run_logger(), "latents", len(todo), " encoded")
    remote_images = any("://" in image.url for image, _ in todo)
    with worker_pool(io_threads(remote_images, not store.is_local)) as pool:
        batches = (batch for group in by_size for batch in chunks(group, size))  # never two sizes in one pass
        for batch, cuts in prefetched(pool, batches, load):
            latents = padded_pass(encode, [c.pixels for c in cuts], size)
            flipped = padded_pass(encode, [c.mirrored for c in cuts], size) if flip else [None] * len(cuts)
            objects = []
            for (image, key), cut, latent, mirrored in zip(batch, cuts, latents, flipped):
                tensors = {**cut.tensors, "latent": latent}
                if mirrored is not None:
                    tensors["latent_flipped"] = mirrored
                objects.append((image, key, tensors))
            writes.append(pool.submit(write_latents, store, objects))
            progress.advance(len(batch))
            while len(writes) > 2 or (writes and writes[0].done()):  # a failed write stops the run here
                stored.update(writes.popleft().result())
        for future in writes:
            stored.update(future.result())
    return stored


def write_latents(store: Store, objects: list[tuple[ImageItem, str, dict[str, torch.Tensor]]]) -> dict[str, ObjectRef]:
    """Store one batch's latents (in an I/O thread); {image sha256: stored latent}."""
    return {image.sha256: store.put_tensors("latents", key, tensors, metadata={"image": image.name})
            for image, key, tensors in objects}
