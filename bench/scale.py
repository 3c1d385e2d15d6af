"""How the flow scales with the dataset, measured side by side in one process.

    .venv/bin/python bench/scale.py [--sizes 1000 10000 100000] [--steps 20]

For each size N: generates N distinct 32 px images (up to 1,000 distinct captions), then runs the flow on
the tiny SD model (one Prefect server, in a process of its own, for the whole benchmark):
- cold, on one worker thread (one shard at a time): build-latent-cache's images/s over the time
  its shards ran (Prefect's run time of each shard's task run, summed), and a bare loop of batched
  `vae.encode` on one thread over the same images (read, decode, cut, encode; nothing stored) for
  comparison;
- the first re-run after the cold run and a steady re-run, nothing changed, each minus the floor
  (a no-op run of a six-task cached flow on the same server);
- a re-run after one image was added;
- peak RSS of a run in which only training runs, in a fresh process (as a deployment runs it):
  of the whole run, and from when training started until it ended (Linux's VmHWM, reset then), with
  what the flow's process held when training started.
Then the sharded stages on Prefect task runners, cold, on `--dask-images` images: one thread
(torch on one thread) against a local Dask cluster of two worker processes of one thread each.
Prints markdown tables and the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def make_dataset(folder: Path, count: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(f"picture number {i % 1000}\n")  # up to 1,000 distinct captions


def bare_loop(folder: Path, batch: int) -> float:
    """Images/s of read + decode + cut + batched encode, nothing stored."""
    import torch

    from loraflow.builtin import builtin_path
    from loraflow.dataset import to_pixels
    from loraflow.families import get_family

    family = get_family("sd")
    start = time.perf_counter()
    vae = family.load_vae(str(builtin_path("tiny-sd")), torch.device("cpu"))
    paths = sorted(folder.glob("*.png"))
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            pixels = torch.stack([to_pixels(p.read_bytes(), 32, True)[0] for p in paths[i:i + batch]])
            family.encode_images(vae, pixels)
    return len(paths) / (time.perf_counter() - start)


def floor_seconds() -> float:
    """A no-op run of a flow of six cached tasks, on the same server."""
    from prefect import flow, task
    from prefect.cache_policies import INPUTS

    @task(cache_policy=INPUTS, persist_result=True)
    def stage(n: int) -> int:
        return n

    @flow
    def six() -> None:
        for n in range(6):
            stage(n)

    six()
    return timed(six)[0]


def train_only_peak_rss_mib(cfg) -> tuple[float, float, float]:
    """(peak resident memory of the whole run, peak while training ran, resident memory when it
    started) of a run in which only training (and sampling) runs, in a process of its own as a
    deployment's run is (the bench's own process holds what its earlier runs left)."""
    out = subprocess.run([sys.executable, __file__, "--train-only-child", cfg.model_dump_json()],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if out.returncode:
        raise SystemExit(f"train-only run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    peak, training, started = out.stdout.strip().splitlines()[-1].split()
    return float(peak), float(training), float(started)


def train_only_child(cfg_json: str) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import loraflow.training as training
    from flows.finetune import finetune
    from loraflow.config import RunConfig

    measured = {}
    train = training.run

    def run(*args, **kwargs):  # the train task's loop, from the memory the flow's process holds as it starts
        measured["before"] = status_mib("VmHWM")
        measured["started"] = status_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) starts again from here
        try:
            return train(*args, **kwargs)
        finally:
            measured["training"] = status_mib("VmHWM")

    training.run = run
    finetune(RunConfig.model_validate_json(cfg_json))
    peak = max(measured["before"], status_mib("VmHWM"))
    print(peak, measured["training"], measured["started"])


def status_mib(field: str) -> float:
    """A memory field of this process's /proc status. The peak is VmHWM, not `ru_maxrss`: a forked
    child starts with its parent's (this bench's process, with everything its earlier runs left),
    and keeps it across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_seconds(flow_run_id: str, task: str) -> float:
    """The summed run time of `task`'s task runs (one per shard), as Prefect recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:  # task-run states arrive as events, recorded a moment after the flow returns
            runs = [r for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
                    if r.name.startswith(f"{task}[")]
            if all(r.state and r.state.is_final() and r.total_run_time for r in runs) or time.monotonic() > deadline:
                return sum(r.total_run_time.total_seconds() for r in runs)
            time.sleep(0.2)


def sharded_seconds(report) -> float:
    """Wall time of the sharded stages: the last shard's finish, counted from their submission."""
    return max(r.seconds for r in report.tasks if r.task in ("build-latent-cache", "encode-prompts")
               and r.role != "sample prompts")


def runner_speedup(tmp: Path, count: int) -> list[tuple[str, float, int]]:
    """(runner, seconds of the sharded stages, shards) for a cold run on each runner."""
    import torch

    from flows.finetune import finetune
    from loraflow.config import RunConfig

    data = tmp / "data-runners"
    make_dataset(data, count, seed=7)
    rows = []
    threads = torch.get_num_threads()
    for name, runner in [("threads, 1 worker, 1 torch thread", {"workers": 1}),
                         ("Dask local cluster, 2 workers x 1 thread", {"kind": "dask", "workers": 2})]:
        torch.set_num_threads(1)
        cfg = RunConfig.model_validate({
            "dataset": {"source": str(data), "shard_size": max(1, count // 8)},
            "train": {"steps": 1, "checkpoint_every": 1}, "sample": {"prompts": []},
            "runner": runner, "store": str(tmp / f"store-runner-{len(rows)}")})
        report = finetune(cfg)
        torch.set_num_threads(threads)
        rows.append((name, sharded_seconds(report), sum(r.task == "build-latent-cache" for r in report.tasks)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dask-images", type=int, default=4000)
    parser.add_argument("--train-only-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_only_child:
        return train_only_child(args.train_only_child)

    from flows.finetune import finetune
    from loraflow.config import RunConfig

    tmp = Path(tempfile.mkdtemp(prefix="loraflow-scale-"))
    os.environ.setdefault("LORAFLOW_HOME", str(tmp / "home"))
    from loraflow.builtin import builtin_path

    builtin_path("tiny-sd")  # built before anything is timed
    # One Prefect server in a process of its own for every run, this process's and its children's,
    # as under a deployment.
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # the children's
    contextlib.ExitStack().enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url}))
    floor = floor_seconds()
    rows = []
    for n in args.sizes:
        data = tmp / f"data-{n}"
        make_dataset(data, n)
        cfg = RunConfig.model_validate({
            "dataset": {"source": str(data)},
            "train": {"steps": args.steps, "checkpoint_every": args.steps},
            "sample": {"prompts": ["picture number 0"], "steps": 2, "images_per_prompt": 1},
            "store": str(tmp / f"store-{n}"),
        })
        bare = bare_loop(data, batch=8)
        # Cold, one shard at a time (runner.workers is in no key): the latent shards' run time is then
        # one thread encoding, as in the bare loop, not shared with the captions' shards.
        one_worker = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"workers": 1})})
        cold_s, cold = timed(lambda: finetune(one_worker))
        latents = [r for r in cold.tasks if r.task == "build-latent-cache"]
        first_s, _ = timed(lambda: finetune(cfg))
        steady_s, _ = timed(lambda: finetune(cfg))
        make_dataset(tmp / "extra", 1, seed=n)
        for suffix in (".png", ".txt"):
            (tmp / "extra" / f"000000{suffix}").rename(data / f"extra{suffix}")
        (tmp / "extra").rmdir()
        added_s, _ = timed(lambda: finetune(cfg))
        retrain = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})})
        rss = train_only_peak_rss_mib(retrain)
        encoding = run_seconds(cold.flow_run_id, "build-latent-cache")
        rows.append((n, len(latents), sum(r.computed for r in latents) / encoding, bare, cold_s,
                     first_s - floor, steady_s - floor, added_s, rss))
        print(f"done: {n} images", flush=True)

    print(f"\ntiny SD, 32 px, train {args.steps} steps; floor (six cached tasks, no-op) {floor:.2f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| images | shards | latent cache img/s | bare loop img/s | ratio | cold run s | first re-run − floor s "
          "| steady re-run − floor s | one image added s | train-only run peak RSS MiB | training's peak RSS MiB "
          "| RSS as training starts MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, shards, cache, bare, cold_s, first, steady, added, (peak, training, started) in rows:
        print(f"| {n} | {shards} | {cache:.0f} | {bare:.0f} | {cache / bare:.2f} | {cold_s:.1f} | {first:.2f} "
              f"| {steady:.2f} | {added:.1f} | {peak:.0f} | {training:.0f} | {started:.0f} |")
    if args.dask_images:
        speed = runner_speedup(tmp, args.dask_images)
        print(f"\nsharded stages, cold, {args.dask_images} images (latents and captions), 8 shards")
        print("| task runner | seconds | shards | speed-up |")
        print("|---|---|---|---|")
        for name, seconds, shards in speed:
            print(f"| {name} | {seconds:.1f} | {shards} | {speed[0][1] / seconds:.2f}x |")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
