"""build-latent-cache: one latent per image, encoding only images not already in the store.

Images are encoded in fixed-shape batches (`loraflow.batching`): an object's bytes depend on its
key and the batch size, never on which other images share its pass. While the VAE runs, helper
processes (`dataset.helpers`) read, check and cut the next batches and write the finished latents.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch
from prefect import get_run_logger, task

from loraflow.batching import (GPU_IMAGE_BATCH, batch_size_for, check_stop, chunks, io_threads, may_start_processes,
                               padded_pass, worker_pool)
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
# resolution / aspect-ratio buckets / crop / flip settings. Not the shard label, the batch size or the
# helper processes: they change how the work is cut, not what a latent is.
HELPERS = 4  # helper processes at most, by default: past that a VAE on a GPU rarely waits for pixels
CUT_AHEAD = 2  # batches read and cut ahead of the one being encoded
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
            store: Store, shard: str = "1/1", batch_size: int | None = None, buckets: list[Size] | None = None,
            helpers: int | None = None) -> Latents:
    """What the task would return, by key (for `loraflow plan`)."""
    unique = {i.sha256: i for i in store.read_list(images, ImageItem)}
    sizes = {sha: cut_size(i.height, i.width, resolution, buckets) for sha, i in unique.items()}
    keys = latent_keys(unique, sizes, family, vae, center_crop, flip)
    return Latents.of({sha: planned("latents", key, "safetensors") for sha, key in keys.items()})


@dataclass
class Cuts:
    """A batch of images read, checked and cut to the VAE's input: pixels (and mirrored pixels when
    flipping), plus each image's arrays stored beside its latent (its size and crop)."""

    pixels: np.ndarray  # (batch, 3, H, W), float32 in [-1, 1]
    mirrored: np.ndarray | None
    tensors: list[dict[str, np.ndarray]]


def cut_images(images: list[tuple[str, str, Size]], center_crop: bool, flip: bool, storage_options: dict) -> Cuts:
    """Read, check and cut each (url, sha256, size) of a batch (in a helper process: arrays, not
    tensors, travel back, pickled, which costs less than torch's shared memory for each tensor)."""
    pixels, mirrored, tensors = [], [], []
    for url, sha256, size in images:
        data = read_image(url, storage_options)
        if sha256_bytes(data) != sha256:
            raise DatasetError(f"dataset: {url} changed while the run was reading it")
        cut, cut_tensors = to_pixels(data, size, center_crop)
        pixels.append(cut)
        if flip:
            mirror, how = to_pixels(data, size, center_crop, flip=True)
            cut_tensors["crop_top_left_flipped"] = how["crop_top_left"]
            mirrored.append(mirror)
        tensors.append({name: t.numpy() for name, t in cut_tensors.items()})
    return Cuts(torch.stack(pixels).numpy(), torch.stack(mirrored).numpy() if flip else None, tensors)


def helper_processes(configured: int | None, in_memory: bool) -> int:
    """Processes that read and cut images and write latents while the VAE encodes: the configured
    number, or one per core beside the encoder's, up to HELPERS. 0 (threads instead) where no
    process may be started, and where the store or the images are in memory:// (held by this
    process alone: a helper's writes would be lost)."""
    if in_memory or not may_start_processes():
        return 0
    if configured is not None:
        return configured
    return max(0, min(HELPERS, (os.cpu_count() or 1) - 1))


@task(**stage("build-latent-cache"), task_run_name="build-latent-cache[{shard}]", cache_policy=CACHE_KEY,
      result_serializer="json")
def build_latent_cache(images: ListRef, family: str, vae: Component, resolution: int, center_crop: bool,
                       flip: bool, store: Store, shard: str = "1/1", batch_size: int | None = None,
                       buckets: list[Size] | None = None, helpers: int | None = None) -> Latents:
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
        items.update(encode_latents(todo, sizes, family, vae, center_crop, flip, store, batch_size, helpers))
    logger.info("%d latent(s) encoded, %d reused", len(todo), len(items) - len(todo))
    latents = Latents.of(items, computed=len(todo), reused=len(items) - len(todo))
    store.vouch_for(latents.refs())
    return latents


def encode_latents(todo: list[tuple[ImageItem, str]], sizes: dict[str, Size], family: str, vae: Component,
                   center_crop: bool, flip: bool, store: Store, batch_size: int | None,
                   helpers: int | None = None) -> dict[str, ObjectRef]:
    """Encode and store every (image, key) in `todo` (grouped by cut size); {image sha256: stored latent}."""
    fam = get_family(family)
    device = pick_device()
    model = loaded(fam.load_vae, vae.path, device)
    size = batch_size_for(batch_size, device, GPU_IMAGE_BATCH)

    def encode(pixels: np.ndarray) -> torch.Tensor:
        """A batch's latents, on the CPU, from a pass padded to `size` images."""
        out = padded_pass(lambda batch: fam.encode_images(model, torch.stack(batch)), list(torch.from_numpy(pixels)), size)
        return torch.stack(out).cpu()

    by_size = [list(group) for _, group in groupby(todo, key=lambda job: sizes[job[0].sha256])]
    batches = [batch for group in by_size for batch in chunks(group, size)]  # never two sizes in one pass
    stored: dict[str, ObjectRef] = {}
    writes: deque[Future] = deque()  # each batch's writes: {image sha256: stored latent}
    progress = Progress(get_run_logger(), "latents", len(todo), " encoded")
    in_memory = store.in_memory or any(image.url.startswith("memory://") for image, _ in todo)
    helpers = helper_processes(helpers, in_memory)
    remote_images = any("://" in image.url for image, _ in todo)
    with worker_pool(helpers or io_threads(remote_images, not store.is_local), processes=helpers > 0) as pool:

        def cut(batch: list[tuple[ImageItem, str]]) -> Future:
            jobs = [(image.url, image.sha256, sizes[image.sha256]) for image, _ in batch]
            return pool.submit(cut_images, jobs, center_crop, flip, store.storage_options)

        cutting = deque(cut(batch) for batch in batches[:CUT_AHEAD])
        for i, batch in enumerate(batches):
            check_stop()
            cuts = cutting.popleft().result()  # a bad image's error is raised here, naming the file
            if i + CUT_AHEAD < len(batches):
                cutting.append(cut(batches[i + CUT_AHEAD]))
            latents = encode(cuts.pixels)
            flipped = encode(cuts.mirrored) if flip else None
            jobs = [(image.sha256, image.name, key) for image, key in batch]
            writes.append(pool.submit(write_latents, store, jobs, latents, flipped, cuts.tensors))
            progress.advance(len(batch))
            while len(writes) > 2 or (writes and writes[0].done()):  # a failed write stops the run here
                stored.update(remembered(store, writes.popleft().result()))
        for future in writes:
            stored.update(remembered(store, future.result()))
    return stored


def remembered(store: Store, written: dict[str, tuple[ObjectRef, str | None]]) -> dict[str, ObjectRef]:
    """A batch's written latents, entered in this process's digest table: {image sha256: latent}."""
    store.remember(list(written.values()))
    return {sha: ref for sha, (ref, _) in written.items()}


def write_latents(store: Store, jobs: list[tuple[str, str, str]], latents: torch.Tensor, flipped: torch.Tensor | None,
                  cut_tensors: list[dict[str, np.ndarray]]) -> dict[str, tuple[ObjectRef, str | None]]:
    """Store one batch's latents, each with the tensors of its cut (in a helper process or a
    thread); `jobs` are (image sha256, image name, latent key). {image sha256: (stored latent, the
    version written)}, for the run's process to `remember`."""
    written = {}
    for i, (sha, name, key) in enumerate(jobs):
        tensors = {**{k: torch.from_numpy(a) for k, a in cut_tensors[i].items()}, "latent": latents[i]}
        if flipped is not None:
            tensors["latent_flipped"] = flipped[i]
        written[sha] = store.write_tensors("latents", key, tensors, metadata={"image": name})
    return written
