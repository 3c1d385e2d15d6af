"""Training speed and memory: loraflow's train task against a bare loop on the same cached tensors,
and against diffusers' example script `train_text_to_image_lora.py` on the same model and images.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train.py [--steps 60] [--images 32] [--resolution 256]
        [--diffusers-script diffusers/examples/text_to_image/train_text_to_image_lora.py]

The model is the tiny SD (UNet, CLIP) with a VAE that downsamples 8x, as real SD VAEs do, so
256 px images give 32x32 latents like a real model's. Each measurement runs in a process of its
own, one after the other (never side by side), and reports:
- loraflow: the flow on a local store (latents and caption embeddings cached first, no samples);
  steps/s of its train task from the metrics it stores (steps 11..N, after warm-up). Twice: reporting
  to a Prefect server in a process of its own (as a deployment's flow run does), and in Prefect's
  ephemeral mode, which imports the server's code (FastAPI, SQLAlchemy, ...) into the flow's process;
- bare: the latents and embeddings that run cached, read into memory, then a plain loop (same
  UNet, same peft LoRA config, AdamW, same batch size) timed over the same steps;
- diffusers (with --diffusers-script): the example script, unmodified, on the same model folder and
  the same images as an imagefolder with metadata.jsonl (it encodes every batch with the VAE and the
  text encoder each step: it has no cache), same resolution, batch size, rank and learning rate, no
  validation, `--report_to tensorboard`, offline; steps/s from the wall times of its logged
  `train_loss` events (steps 11..N). It needs `datasets` (the `bench` extra) and torchvision's PIL
  transforms, which `bench/shims/torchvision` provides on that process's PYTHONPATH only (torchvision
  from PyPI does not import beside this torch);
- peak RSS of each process (VmHWM; the diffusers script's from wait4, at least this bench's own RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
WARMUP = 10


def build_model(folder: Path) -> None:
    """tiny-sd with a 4-level (8x) KL VAE of random weights: training never runs the VAE."""
    from diffusers import AutoencoderKL

    from loraflow.builtin import builtin_path

    shutil.copytree(builtin_path("tiny-sd"), folder)
    shutil.rmtree(folder / "vae")
    AutoencoderKL(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                  norm_num_groups=8, sample_size=256).save_pretrained(folder / "vae")


def config(root: Path, steps: int, resolution: int, store: str = "store"):
    from loraflow.config import RunConfig

    return RunConfig.model_validate({
        "model": {"family": "sd", "source": str(root / "model")},
        "dataset": {"source": str(root / "data"), "resolution": resolution},
        "train": {"method": "lora", "steps": steps, "checkpoint_every": steps, "batch_size": 4,
                  "learning_rate": 1e-4, "log_every": 1000},
        "sample": {"prompts": []},
        "store": str(root / store),
    })


def run_loraflow(root: Path, steps: int, resolution: int, store: str = "store") -> dict:
    from flows.finetune import finetune
    from loraflow.sealed import unsealed_json

    report = finetune(config(root, steps, resolution, store))
    rows = json.loads(unsealed_json(open(report.metrics, "rb").read()))
    return {"steps_per_s": (steps - WARMUP) / (rows[-1]["seconds"] - rows[WARMUP - 1]["seconds"])}


def run_bare(root: Path, steps: int, resolution: int) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from loraflow.manifests import Examples
    from loraflow.store import Store

    store = Store(str(root / "store"))
    (listed,) = (root / "store" / "objects" / "lists").rglob("*.safetensors")  # the loraflow run's examples table
    examples = Examples.parse(listed.read_bytes())
    latents = torch.stack([store.read_tensors(examples.latent(i))["latent"] for i in range(len(examples))])
    embeds = torch.stack([store.read_tensors(examples.caption_of(i))["prompt_embeds"] for i in range(len(examples))])

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(root / "model", subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler.from_pretrained(root / "model", subfolder="scheduler")
    unet.train()
    for step in range(steps):
        if step == WARMUP:
            start = time.perf_counter()
        index = torch.randperm(len(examples))[:4]
        x, cond = latents[index], embeds[index]
        noise = torch.randn_like(x)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),))
        pred = unet(scheduler.add_noise(x, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # loraflow's default, so the work is the same
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"steps_per_s": (steps - WARMUP) / (time.perf_counter() - start)}


def run_diffusers(root: Path, steps: int, resolution: int, script: Path) -> dict:
    """The example script in a process of its own; its peak RSS from wait4, its speed from its events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = root / "diffusers-out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent / "shims"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(root / "hf-datasets"))
    command = [sys.executable, str(script), "--pretrained_model_name_or_path", str(root / "model"),
               "--train_data_dir", str(root / "imagefolder"), "--cache_dir", str(root / "hf-datasets"),
               "--resolution", str(resolution), "--train_batch_size", "4", "--rank", "4",
               "--learning_rate", "1e-4", "--max_train_steps", str(steps), "--checkpointing_steps", str(10 * steps),
               "--seed", "0", "--report_to", "tensorboard", "--output_dir", str(out)]
    with open(root / "diffusers.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"diffusers script failed:\n{(root / 'diffusers.log').read_text()[-3000:]}")
    accumulator = EventAccumulator(str(out / "logs" / "text2image-fine-tune"))  # the script's tracker project
    accumulator.Reload()
    wall = {e.step: e.wall_time for e in accumulator.Scalars("train_loss")}
    return {"steps_per_s": (steps - WARMUP) / (wall[steps] - wall[WARMUP]), "peak_rss_mib": usage.ru_maxrss / 1024}


def child(mode: str, root: Path, steps: int, resolution: int, env: dict | None = None) -> dict:
    """Run `mode` in a process of its own (`env`: variables to set, or with None to unset)."""
    environ = {name: value for name, value in {**os.environ, **(env or {})}.items() if value is not None}
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--root", str(root), "--steps", str(steps),
                          "--resolution", str(resolution)], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                         env=environ)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_imagefolder(data: Path, folder: Path) -> None:
    """The same images, captioned in a metadata.jsonl (what `datasets`' imagefolder reads)."""
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as metadata:
        for image in sorted(data.glob("*.png")):
            shutil.copy(image, folder / image.name)
            caption = image.with_suffix(".txt").read_text().strip()
            metadata.write(json.dumps({"file_name": image.name, "text": caption}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--diffusers-script", type=Path,
                        help="diffusers' examples/text_to_image/train_text_to_image_lora.py (see the README)")
    parser.add_argument("--child")
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(Path(__file__).parents[1]))
        runs = {"loraflow": run_loraflow, "bare": run_bare,
                "loraflow-embedded": lambda *a: run_loraflow(*a, store="store-embedded")}
        result = runs[args.child](Path(args.root), args.steps, args.resolution)
        # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's RSS, kept across exec.
        result["peak_rss_mib"] = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text()
                                      .splitlines() if line.startswith("VmHWM:"))
        print(json.dumps(result))
        return

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from loraflow.dataset import COLOURS, SHAPES, draw_shape

    root = Path(tempfile.mkdtemp(prefix="loraflow-bench-train-"))
    build_model(root / "model")
    (root / "data").mkdir()
    for i in range(args.images):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        draw_shape(colour, shape, i, size=args.resolution).save(root / "data" / f"{i:04d}.png")
        (root / "data" / f"{i:04d}.txt").write_text(f"a {colour} {shape}\n")
    # As under a deployment, the flow reports to a Prefect server in a process of its own.
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    ours = child("loraflow", root, args.steps, args.resolution, env={"PREFECT_API_URL": server.api_url})
    ours |= {"load": os.getloadavg()[0]}
    server.stop()
    # Without PREFECT_API_URL, Prefect's ephemeral mode imports its server's code into the flow's process.
    embedded = child("loraflow-embedded", root, args.steps, args.resolution, env={"PREFECT_API_URL": None})
    embedded |= {"load": os.getloadavg()[0]}
    bare = child("bare", root, args.steps, args.resolution) | {"load": os.getloadavg()[0]}
    rows = [("loraflow train task (Prefect server in its own process)", ours),
            ("loraflow train task (Prefect's ephemeral server)", embedded), ("bare loop, same tensors", bare)]
    if args.diffusers_script:
        write_imagefolder(root / "data", root / "imagefolder")
        theirs = run_diffusers(root, args.steps, args.resolution, args.diffusers_script.resolve())
        rows.append(("diffusers train_text_to_image_lora.py", theirs | {"load": os.getloadavg()[0]}))
    print(f"tiny SD UNet + LoRA r4 (attention), 8x VAE, {args.resolution} px -> "
          f"{args.resolution // 8}x{args.resolution // 8} latents, batch 4, {args.steps} steps "
          f"(timed {WARMUP + 1}..{args.steps}), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| loop | steps/s | ratio to bare | peak RSS MiB | load (1 min, at its end) |\n|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['steps_per_s']:.2f} | {r['steps_per_s'] / bare['steps_per_s']:.2f} "
              f"| {r['peak_rss_mib']:.0f} | {r['load']:.2f} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
