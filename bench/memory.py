"""Memory of the frozen base under a LoRA on a real-size denoiser: float32, bfloat16, and quantized.

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py [--model sdxl|sd3] [--latent 32] [--no-step]
        [--gradient-checkpointing]

The denoiser is built from its real published config with random weights (no download), saved once
as a local diffusers folder (bf16 safetensors in 2 GB shards, under --folder), then loaded the way
`train` loads it (`Family.load_denoiser` with `loraflow.precision.base_load_options`) in a process
of its own per case, one after the other. Each case reports:
- params: the bytes of the loaded parameters as stored (a torchao tensor: its int8/float8 data and
  scales), and the share of them in quantized linear layers;
- load peak / load RSS: peak and resident set size of the process once the model is loaded;
- step peak, step s: with --step (the default; on a CPU only for the cases without bf16 autocast,
  which takes tens of minutes a step where the CPU has no bf16 matrix units), one LoRA training step as `loraflow.training` takes
  it (rank-4 attention LoRA in float32, AdamW, accelerate's autocast, `Family.training_loss`) on one
  latent of --latent x --latent: the process's peak RSS over the step (reset after the load, through
  /proc/self/clear_refs) and its wall time.
The load average is printed before and after; other work on the machine slows the step, not memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters).
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (2,028,328,000 parameters).
SD3_MEDIUM_TRANSFORMER = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192, "sample_size": 128,
}
# SDXL's VAE (8x): all the SDXL family reads of it is its downsampling, for time_ids.
SDXL_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}

MODELS = {"sdxl": SDXL_UNET, "sd3": SD3_MEDIUM_TRANSFORMER}

# (train.base_dtype, train.base_quantization, train.mixed_precision)
CASES = [
    ("float32", None, "no"),
    ("bfloat16", None, "bf16"),
    ("float32", "int8_weight_only", "no"),
    ("bfloat16", "int8_weight_only", "bf16"),
    ("float32", "float8_weight_only", "no"),
    ("bfloat16", "float8_weight_only", "bf16"),
]


def build(model: str, folder: Path) -> None:
    """The real architecture with random weights, saved as bf16 safetensors; scheduler from the tiny model."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from loraflow.builtin import builtin_path

    if (folder / "done").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # half the memory and disk of building in float32
    if model == "sdxl":
        UNet2DConditionModel(**SDXL_UNET).save_pretrained(folder / "unet", max_shard_size="2GB")
        (folder / "vae").mkdir()
        (folder / "vae" / "config.json").write_text(json.dumps(SDXL_VAE))
    else:
        SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER).save_pretrained(folder / "transformer", max_shard_size="2GB")
    shutil.copytree(builtin_path(f"tiny-{model}") / "scheduler", folder / "scheduler")
    (folder / "done").touch()


def measure(model: str, folder: Path, base_dtype: str, quantization: str | None, mixed_precision: str,
            latent: int, step: bool, checkpointing: bool) -> dict:
    """One case, in this process."""
    from accelerate import Accelerator
    from diffusers.training_utils import cast_training_params

    from loraflow.config import TrainConfig
    from loraflow.families import get_family
    from loraflow.precision import autocast_quantized, base_load_options

    hp = TrainConfig(base_dtype=base_dtype, base_quantization=quantization, mixed_precision=mixed_precision,
                     batch_size=1, rank=4)
    fam = get_family(model)
    started = time.perf_counter()
    denoiser = fam.load_denoiser(str(folder), **base_load_options(hp))
    loaded = time.perf_counter() - started
    touch(denoiser)
    params, quantized = parameter_bytes(denoiser)
    result = {"model": model, "base_dtype": base_dtype, "quantization": quantization, "mixed_precision": mixed_precision,
              "parameters": sum(p.numel() for p in denoiser.parameters()), "param_bytes": params,
              "quantized_share": quantized / params, "load_s": loaded, "load_peak": peak_rss(), "load_rss": rss()}
    if not step or (mixed_precision != "no" and not torch.cuda.is_available()):
        return result

    denoiser.requires_grad_(False)
    fam.add_lora(denoiser, hp)
    cast_training_params(denoiser, dtype=torch.float32)
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    if quantization:
        autocast_quantized(denoiser)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    accelerator = Accelerator(mixed_precision=mixed_precision)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ddp, optimizer = accelerator.prepare(denoiser, optimizer)
    schedule = fam.load_noise_schedule(str(folder))
    generator = torch.Generator().manual_seed(0)
    batch, cond = example(model, denoiser, latent)
    draws = fam.draw_noise(schedule, batch["latent"].shape, generator, hp)
    reset_peak()
    started = time.perf_counter()
    loss = fam.training_loss(ddp, schedule, batch, cond, draws, hp)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    result |= {"lora_parameters": sum(p.numel() for p in params), "loss": loss.item(),
               "step_s": time.perf_counter() - started, "step_peak": peak_rss()}
    return result


def example(model: str, denoiser, latent: int):
    """One random latent and caption embedding of the shapes the family caches (77 CLIP tokens; SD3
    also 77 T5 tokens)."""

    c = denoiser.config
    if model == "sdxl":
        batch = {"latent": torch.randn(1, c.in_channels, latent, latent),
                 "original_size": torch.tensor([[latent * 8, latent * 8]]), "crop_top_left": torch.tensor([[0, 0]])}
        return batch, {"prompt_embeds": torch.randn(1, 77, c.cross_attention_dim),
                       "pooled_prompt_embeds": torch.randn(1, 1280)}
    batch = {"latent": torch.randn(1, c.in_channels, latent, latent)}
    return batch, {"prompt_embeds": torch.randn(1, 154, c.joint_attention_dim),
                   "pooled_prompt_embeds": torch.randn(1, c.pooled_projection_dim)}


def stored_tensors(p) -> list:
    """A parameter's tensors as held in memory: a torchao tensor's data and scales, or itself."""
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return [p]
    if not isinstance(p, TorchAOBaseTensor):
        return [p]
    names = [*p.tensor_data_names, *getattr(p, "optional_tensor_data_names", [])]
    return [t for t in (getattr(p, n) for n in names) if t is not None]


def parameter_bytes(model) -> tuple[int, int]:
    """(bytes of every parameter as stored, bytes of those that are torchao tensors)."""
    total = quantized = 0
    for p in model.parameters():
        size = sum(t.nbytes for t in stored_tensors(p))
        total += size
        quantized += size if stored_tensors(p)[0] is not p else 0
    return total, quantized


def touch(model) -> None:
    """Read every page of every weight once: weights loaded in the file's own dtype are mmap'd and
    resident only once read (as training reads them), which loading alone does not."""
    with torch.no_grad():
        for p in model.parameters():
            for t in stored_tensors(p):
                t.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    return status("VmHWM")


def rss() -> int:
    return status("VmRSS")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="sdxl")
    parser.add_argument("--latent", type=int, default=32, help="latent side for the training step (32: 256 px)")
    parser.add_argument("--step", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="train.gradient_checkpointing: true")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/loraflow-bench-memory"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, as JSON
    args = parser.parse_args()
    folder = args.folder / args.model
    if args.case:
        print(json.dumps(measure(args.model, folder, *json.loads(args.case), args.latent, args.step,
                                 args.gradient_checkpointing)))
        return

    print(f"load average before: {os.getloadavg()}", flush=True)
    started = time.perf_counter()
    build(args.model, folder)
    print(f"built {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for case in CASES:
        command = [sys.executable, __file__, "--model", args.model, "--latent", str(args.latent),
                   "--folder", str(args.folder), "--case", json.dumps(case), "--step" if args.step else "--no-step",
                   *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"{case}: failed\n{done.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(f"\n{args.model}: {rows[0]['parameters']:,} parameters; step on one {args.latent}x{args.latent} latent"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}\n"
          "| base_dtype | base_quantization | mixed_precision | params GiB | load peak GiB | loaded RSS GiB"
          + (" | step peak GiB | step s |" if args.step else " |"))
    print("|---|---|---|---|---|---|" + ("---|---|" if args.step else ""))
    for r in rows:
        line = (f"| {r['base_dtype']} | {r['quantization'] or '-'} | {r['mixed_precision']} | {gib(r['param_bytes'])} | "
                f"{gib(r['load_peak'])} | {gib(r['load_rss'])} |")
        if args.step:
            line += f" {gib(r['step_peak'])} | {r['step_s']:.1f} |" if "step_s" in r else " - | - |"
        print(line)


if __name__ == "__main__":
    main()
