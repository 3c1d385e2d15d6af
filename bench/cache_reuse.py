"""How much a re-run costs compared with a cold run, measured side by side in one process.

    .venv/bin/python bench/cache_reuse.py [--images-per-class 4] [--steps 100]

Runs the flow on the tiny SD model and a generated dataset: cold, then with nothing changed, with
one image added, with one sample prompt edited. Also times fingerprinting a large weight file
without and with the (path, size, mtime) fast path. Prints a markdown table of seconds and ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images-per-class", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--weights-mb", type=int, default=512)
    args = parser.parse_args()

    from flows.finetune import finetune
    from loraflow.config import RunConfig
    from loraflow.dataset import draw_shape, generate_shapes
    from loraflow.fingerprint import fingerprint_folders

    tmp = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    os.environ.setdefault("LORAFLOW_HOME", str(tmp / "home"))
    generate_shapes(tmp / "data", variants=args.images_per_class)
    cfg = RunConfig.model_validate({
        "dataset": {"source": str(tmp / "data")},
        "train": {"steps": args.steps, "checkpoint_every": args.steps},
        "sample": {"prompts": ["a red circle", "a blue square", "a green triangle"], "steps": 10},
        "store": str(tmp / "store"),
    })
    finetune(cfg.model_copy(update={"store": str(tmp / "warmup")}))  # server start, imports, model build

    rows = []
    cold, _ = timed(lambda: finetune(cfg))
    rows.append(("cold run", cold))
    rows.append(("nothing changed", timed(lambda: finetune(cfg))[0]))
    draw_shape("red", "square", 5).save(tmp / "data" / "extra.png")
    (tmp / "data" / "extra.txt").write_text("a small red square\n")
    rows.append(("one image added", timed(lambda: finetune(cfg))[0]))
    edited = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"prompts": ["a red circle", "a blue square", "a yellow moon"]})})
    rows.append(("one sample prompt edited", timed(lambda: finetune(edited))[0]))

    images = len(list((tmp / "data").glob("*.png")))
    print(f"\nflow runs: tiny SD, {images} images, {args.steps} steps, 3 sample prompts")
    print("| change before the run | seconds | × cold run |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / cold:.2f} |")

    model = tmp / "model" / "unet"
    model.mkdir(parents=True)
    with open(model / "weights.bin", "wb") as f:
        for _ in range(args.weights_mb):
            f.write(os.urandom(1 << 20))
    full, _ = timed(lambda: fingerprint_folders(tmp / "model", ["unet"]))
    fast, _ = timed(lambda: fingerprint_folders(tmp / "model", ["unet"]))
    print(f"\nfingerprint of a {args.weights_mb} MB weight file")
    print("| pass | seconds | × first pass |\n|---|---|---|")
    print(f"| first (reads and hashes) | {full:.3f} | 1.00 |")
    print(f"| again (unchanged stat: size, mtime, ctime, inode) | {fast:.4f} | {fast / full:.4f} |")


if __name__ == "__main__":
    main()
