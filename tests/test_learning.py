"""Training learns: samples whose prompt names a colour look like that colour's training images.

This guards against captions and latents drifting out of alignment (e.g. latents read back by
loader position while captions are shuffled): with misaligned pairs the colours come out wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from loraflow.builtin import builtin_path
from loraflow.dataset import COLOURS, builtin_dataset, load_dataset, to_pixels
from loraflow.manifests import Examples
from loraflow.models import resolve_model
from loraflow.store import Store, safetensors_metadata
from tasks.encode_prompts import embedding_key
from tests.helpers import run, small_config


def chroma(rgb: np.ndarray) -> np.ndarray:
    return rgb - rgb.mean()  # colour without brightness


# The training defaults otherwise (constant LR after 10 warmup steps, clipping at 1.0, AdamW).
METHODS = {
    # Seed 1: full fine-tuning at seed 0 sat closest to the bound below.
    "full": {"method": "full", "learning_rate": 1e-3, "seed": 1},
    # Attention layers only. Caption dropout trains the unconditional prediction that classifier-free
    # guidance steers away from: without it a LoRA that moved every output towards a colour makes
    # guidance push samples away from that colour (over seeds 0-2 one colour per seed came out as its
    # opposite, ranked 3rd or 4th); with it 3 or 4 of 4 colours were learned at every seed.
    "lora": {"method": "lora", "rank": 8, "alpha": 8.0, "learning_rate": 1e-2, "caption_dropout": 0.1},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_samples_take_the_colour_their_prompt_names(tmp_path, method):
    data = builtin_dataset("shapes")
    cfg = small_config(
        tmp_path / "store", data,
        encoder={"max_length": 16},
        train={"steps": 600, "checkpoint_every": 600, "batch_size": 8, **METHODS[method]},
        sample={"prompts": [f"a {c} circle" for c in COLOURS], "steps": 20, "guidance_scale": 5.0, "images_per_prompt": 4},
    )
    report, states = run(cfg)
    assert states["train"] == "Completed"

    # Each colour's training images as the model sees them: through the same VAE and back.
    vae = AutoencoderKL.from_pretrained(builtin_path("tiny-sd"), subfolder="vae")
    reference = {}
    for colour in COLOURS:
        pixels = torch.stack([to_pixels(p.read_bytes(), 32, True)[0] for p in sorted(Path(data).glob(f"{colour}_*.png"))])
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
        reference[colour] = chroma(((decoded + 1) * 127.5).mean((0, 2, 3)).numpy())

    # Where each sample's prompt colour ranks among the four by distance to the sample's colour.
    # Misaligned pairs give colours unrelated to prompts (mean rank 2.5). The tiny model learns
    # colour roughly and red and yellow lie close through its VAE, so one near miss is allowed, not
    # a far one. Over train seeds 0-2 the mean rank was 1.25-1.5 and no sample ranked below 2nd
    # before sharding; since latents are encoded in a shard's worker thread (last bits differ) two
    # samples of 16 ranked 3rd, never 4th. What misalignment would break is also checked directly:
    # every example's latent was made from that example's image, its embedding from that image's caption.
    ranks: dict[str, list[int]] = {c: [] for c in COLOURS}
    for url in report.samples:
        image = Image.open(url)
        mean = chroma(np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0))
        nearest_first = sorted(COLOURS, key=lambda c: np.linalg.norm(mean - reference[c]))
        colour = image.text["prompt"].split()[1]
        ranks[colour].append(nearest_first.index(colour) + 1)
    every = [r for rs in ranks.values() for r in rs]
    assert len(every) == 4 * len(COLOURS)
    assert max(every) <= 3 and np.mean(every) <= 1.5, ranks
    # A colour is learned when most of its samples are nearest to it: at least 3 of the 4 (red and
    # yellow lie close through this VAE, so one may swap).
    learned = [c for c, rs in ranks.items() if sum(r == 1 for r in rs) > len(rs) / 2]
    assert len(learned) >= 3, ranks

    store, model = Store(cfg.store), resolve_model(cfg.model)
    captions = {i.name: i.caption for i in load_dataset(cfg.dataset)}
    (trained,) = (tmp_path / "store" / "objects" / "lists").rglob("*.safetensors")  # the examples table
    examples = Examples.parse(trained.read_bytes())
    for i in range(len(examples)):
        image = safetensors_metadata(store.read(examples.latent(i)))["image"]
        caption = examples.caption_of(i)
        assert caption.key == embedding_key(model.family, model.text_encoder, cfg.encoder, captions[image])
