"""build-latent-cache's throughput against a bare loop of batched `vae.encode`, side by side.

    .venv/bin/python bench/latent_throughput.py [--images 1000] [--batch 8] [--repeats 2]

Generates N random 32 px PNGs (with captions), then times, alternately:
- the `build-latent-cache` task, cold (an empty store each time), run as the flow runs it;
- a bare loop over the same files: read, decode and cut (`to_pixels`), `encode_images` in
  batches of `--batch`, nothing stored.
Both load the tiny SD VAE inside the timing. Prints images per second for the best repeat of
each, the ratio (task / bare loop; the goal is >= 0.8) and the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_images(folder: Path, count: int, seed: int, size: int = 32) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(f"random image {i}\n")


def bare_loop(images, model_dir: str, resolution: int, batch: int) -> int:
    import torch
    from accelerate import PartialState

    from loraflow.dataset import to_pixels
    from loraflow.families import get_family

    fam = get_family("sd")
    vae = fam.load_vae(model_dir, PartialState().device)
    encoded = 0
    for start in range(0, len(images), batch):
        pixels = []
        for image in images[start : start + batch]:
            with open(image.url, "rb") as f:
                pixels.append(to_pixels(f.read(), resolution, True)[0])
        encoded += len(fam.encode_images(vae, torch.stack(pixels)))
    return encoded


def task_run(images, model, resolution: int, store_url: str) -> int:
    from loraflow.report import Report, StageRunner
    from loraflow.store import Store
    from tasks import build_latent_cache

    store = Store(store_url)
    run = StageRunner(store, Report(flow_run_id="bench", store=store.url))
    latents = run(build_latent_cache, images=store.put_list(sorted(images, key=lambda i: i.sha256)), family="sd", vae=model.vae,
                  resolution=resolution, center_crop=True, flip=False, store=store, shard="1/1", buckets=None)
    assert report_state(run) == "Completed" and latents.computed == len(images), "not a cold run"
    return latents.computed


def report_state(run) -> str:
    return run.report.tasks[-1].state


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8, help="the bare loop's batch (the task uses its default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    os.environ.setdefault("LORAFLOW_HOME", str(tmp / "home"))
    import torch
    from prefect import flow

    from loraflow.config import DatasetConfig, ModelConfig
    from loraflow.dataset import load_dataset
    from loraflow.models import resolve_model

    model = resolve_model(ModelConfig())
    make_images(tmp / "warmup", 16, seed=1)
    make_images(tmp / "data", args.images, seed=0)
    warmup = list(load_dataset(DatasetConfig(source=str(tmp / "warmup"))))
    images = list(load_dataset(DatasetConfig(source=str(tmp / "data"))))

    @flow(name="latent-throughput")
    def bench() -> list[tuple[str, float]]:
        task_run(warmup, model, args.resolution, str(tmp / "store-warmup"))  # imports, kernels, the Prefect block
        bare_loop(warmup, model.vae.path, args.resolution, args.batch)
        rows = []
        for repeat in range(args.repeats):
            seconds, n = timed(lambda: bare_loop(images, model.vae.path, args.resolution, args.batch))
            rows.append(("bare loop", n / seconds))
            store = str(tmp / f"store-{repeat}")  # empty: a cold run
            seconds, n = timed(lambda: task_run(images, model, args.resolution, store))  # noqa: B023
            rows.append(("build-latent-cache", n / seconds))
        return rows

    load_before = os.getloadavg()
    rows = bench()
    load_after = os.getloadavg()
    best = {name: max(r for n, r in rows if n == name) for name, _ in rows}
    print(f"\nbuild-latent-cache vs bare batched vae.encode: tiny SD, {args.images} random {args.resolution} px PNGs, "
          f"bare batch {args.batch}, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores")
    print("every repeat (img/s): " + ", ".join(f"{name} {rate:.0f}" for name, rate in rows))
    print(f"| | img/s (best of {args.repeats}) |\n|---|---|")
    for name, rate in best.items():
        print(f"| {name} | {rate:.0f} |")
    print(f"ratio build-latent-cache / bare loop: {best['build-latent-cache'] / best['bare loop']:.2f} (goal >= 0.8)")
    before, after = (" ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after))
    print(f"load average (1, 5, 15 min): before {before}, after {after}")


if __name__ == "__main__":
    main()
