"""What a scheduled re-run costs with the dataset, the base model and the store all on S3.

    .venv/bin/python bench/s3_rerun.py [--images-per-class 4] [--steps 100]

Starts moto's S3 server on loopback, uploads a generated dataset and the tiny SD model, and runs
the flow side by side in one process: cold, with nothing changed, with nothing changed on a
"fresh machine" (an empty LORAFLOW_HOME: no model mirror, no remembered digests, so every object
is re-read once), and after one image was added to the bucket. Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
            return server, endpoint
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("moto server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images-per-class", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    import s3fs

    from flows.finetune import finetune
    from loraflow.builtin import builtin_path
    from loraflow.config import RunConfig
    from loraflow.dataset import draw_shape, generate_shapes

    tmp = Path(tempfile.mkdtemp(prefix="loraflow-bench-s3-"))
    os.environ["LORAFLOW_HOME"] = str(tmp / "home")
    server, endpoint = start_moto()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("bench")
        generate_shapes(tmp / "data", variants=args.images_per_class)
        fs.put(str(tmp / "data"), "bench/data", recursive=True)
        fs.put(str(builtin_path("tiny-sd")), "bench/model", recursive=True)
        cfg = RunConfig.model_validate({
            "model": {"source": "s3://bench/model"},
            "dataset": {"source": "s3://bench/data"},
            "train": {"steps": args.steps, "checkpoint_every": args.steps},
            "sample": {"prompts": ["a red circle", "a blue square", "a green triangle"], "steps": 10},
            "store": "s3://bench/store",
            "storage_options": {"endpoint_url": endpoint},
        })
        finetune(cfg.model_copy(update={"store": "s3://bench/warmup"}))  # server start, imports, mirror

        rows = []
        cold, _ = timed(lambda: finetune(cfg))
        rows.append(("cold run", cold))
        rows.append(("nothing changed", timed(lambda: finetune(cfg))[0]))
        os.environ["LORAFLOW_HOME"] = str(tmp / "fresh-machine")
        rows.append(("nothing changed, fresh machine (empty LORAFLOW_HOME)", timed(lambda: finetune(cfg))[0]))
        draw_shape("red", "square", 5).save(tmp / "extra.png")
        fs.put(str(tmp / "extra.png"), "bench/data/extra.png")
        fs.pipe("bench/data/extra.txt", b"a small red square\n")
        rows.append(("one image added", timed(lambda: finetune(cfg))[0]))
    finally:
        server.terminate()

    images = len(list((tmp / "data").glob("*.png"))) + 1
    print(f"\nflow runs on S3 (moto, loopback): tiny SD, {images} images, {args.steps} steps, 3 sample prompts")
    print("| change before the run | seconds | × cold run |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / cold:.2f} |")


if __name__ == "__main__":
    main()
