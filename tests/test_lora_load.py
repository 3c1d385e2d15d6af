"""The trained LoRA loads into the family's own diffusers pipeline with `load_lora_weights`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers import DDIMScheduler
from PIL import Image

from loraflow.builtin import builtin_path
from loraflow.dataset import generate_shapes
from tests.helpers import FAMILIES, run, small_config


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_lora_loads_into_diffusers_pipeline(tmp_path, family):
    generate_shapes(tmp_path / "data", variants=1)
    # No warmup: six steps at the full rate move the LoRA far enough to see in an image.
    cfg = small_config(tmp_path / "store", tmp_path / "data", family, train={"learning_rate": 1e-2, "lr_warmup_steps": 0})
    report, _ = run(cfg)
    prompt = cfg.sample.prompts[0]

    # What a user does: the full pipeline, text encoders included, from the model folder, called
    # with the settings loraflow samples with.
    pipe = DiffusionPipeline.from_pretrained(builtin_path(f"tiny-{family}"))
    kwargs = dict(num_inference_steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance_scale, height=32, width=32)
    if family in ("sd", "sdxl"):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if family == "sdxl":
        kwargs |= dict(negative_prompt="")  # the null embedding; without it SDXL guides from zeros
    if family in ("sd3", "flux", "sana"):
        kwargs |= dict(max_sequence_length=16)
    if family == "flux":  # true CFG from the empty prompt; guidance_scale is the embedded guidance
        kwargs |= dict(negative_prompt="", true_cfg_scale=cfg.sample.guidance_scale,
                       guidance_scale=cfg.sample.guidance_embedding)
    if family == "sana":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        kwargs |= dict(use_resolution_binning=False, complex_human_instruction=None)

    def generate() -> np.ndarray:
        image = pipe(prompt, generator=torch.Generator().manual_seed(cfg.sample.seed), **kwargs).images[0]
        return np.asarray(image, dtype=np.int16)

    before = generate()
    weights = Path(report.weights)
    pipe.load_lora_weights(weights.parent, weight_name=weights.name)
    after = generate()
    assert np.abs(after - before).max() > 3  # the LoRA changes the output, well beyond rounding (<= 1 below)

    # ...into exactly the image loraflow sampled from cached embeddings for the same prompt.
    (ours,) = [u for u in report.samples if Image.open(u).text["prompt"] == prompt]
    assert np.abs(after - np.asarray(Image.open(ours), dtype=np.int16)).max() <= 1
