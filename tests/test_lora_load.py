"""The trained LoRA loads into the family's own diffusers pipeline with `load_lora_weights`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loraflow.dataset import generate_shapes
from tests.helpers import FAMILIES, run, small_config, user_pipeline


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_lora_loads_into_diffusers_pipeline(tmp_path, family):
    generate_shapes(tmp_path / "data", variants=1)
    # No warmup: six steps at the full rate move the LoRA far enough to see in an image.
    cfg = small_config(tmp_path / "store", tmp_path / "data", family, train={"learning_rate": 1e-2, "lr_warmup_steps": 0})
    report, _ = run(cfg)
    prompt = cfg.sample.prompts[0]

    # What a user does: the full pipeline, text encoders included, from the model folder, called
    # with the settings loraflow samples with.
    pipe, generate = user_pipeline(family, cfg)
    before = generate(prompt)
    weights = Path(report.weights)
    pipe.load_lora_weights(weights.parent, weight_name=weights.name)
    after = generate(prompt)
    assert np.abs(after - before).max() > 3  # the LoRA changes the output, well beyond rounding (<= 1 below)

    # ...into exactly the image loraflow sampled from cached embeddings for the same prompt.
    (ours,) = [u for u in report.samples if Image.open(u).text["prompt"] == prompt]
    assert np.abs(after - np.asarray(Image.open(ours), dtype=np.int16)).max() <= 1
