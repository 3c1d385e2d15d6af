"""Aspect-ratio buckets: the plan, batches that never mix buckets, SDXL's time_ids from each
latent's real size and crop, and the latents a bucket change or a new image re-encodes."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from loraflow.buckets import bucket_sizes, pick_bucket, plan_buckets
from loraflow.config import DatasetConfig
from loraflow.dataset import draw_shape, load_dataset
from tests.helpers import STAGES, row, run, small_config, stored_latents

C, R = "Cached", "Completed"
# (file stem, (width, height)): portrait, landscape and square pictures.
PICTURES = [("tall_red_circle", (48, 96)), ("tall_blue_square", (60, 90)), ("wide_green_square", (96, 48)),
            ("wide_yellow_circle", (120, 72)), ("red_square", (64, 64)), ("blue_circle", (80, 80))]
EXPECTED = {"tall_red_circle": (40, 24), "tall_blue_square": (40, 24), "wide_green_square": (24, 40),
            "wide_yellow_circle": (24, 40), "red_square": (32, 32), "blue_circle": (32, 32)}  # (h, w) at 32 px, step 8


def expect(**changed: str) -> dict[str, str]:
    return {stage: changed.get(stage, C) for stage in STAGES}


def write_pictures(folder, pictures=PICTURES):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, size in pictures:
        colour, shape = stem.split("_")[-2:]
        draw_shape(colour, shape, 0).resize(size).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"a {stem.replace('_', ' ')}\n")


def test_buckets_hold_about_resolution_squared_pixels_in_steps():
    sizes = bucket_sizes(1024, 64)
    assert (1024, 1024) in sizes and (1152, 896) in sizes and (896, 1152) in sizes
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 * 1024 and 512 <= min(h, w) for h, w in sizes)
    assert all(h * w > 0.8 * 1024 * 1024 for h, w in sizes if max(h, w) <= 1536)  # close to the pixel budget
    # Each picture goes to the bucket nearest its aspect ratio.
    for height, width in [(1200, 900), (900, 1600), (1000, 1000), (3000, 1000)]:
        chosen = pick_bucket(height, width, sizes)
        ratio = math.log(width / height)
        assert abs(math.log(chosen[1] / chosen[0]) - ratio) == min(abs(math.log(w / h) - ratio) for h, w in sizes)


def test_a_bucket_step_that_leaves_no_buckets_names_the_field():
    with pytest.raises(ValueError, match="dataset.bucket_step: 64 leaves no aspect-ratio buckets at resolution 32"):
        plan_buckets(DatasetConfig(resolution=32, buckets=True), default=False, multiple=8)
    with pytest.raises(ValueError, match="dataset.bucket_step: 12 is not a multiple of 8"):
        plan_buckets(DatasetConfig(resolution=96, buckets=True, bucket_step=12), default=False, multiple=8)
    assert plan_buckets(DatasetConfig(resolution=32), default=False, multiple=8) is None  # SD: off by default


@pytest.mark.slow
def test_sdxl_trains_each_bucket_apart_with_real_time_ids(tmp_path, monkeypatch):
    write_pictures(tmp_path / "data")
    cfg = small_config(tmp_path / "store", tmp_path / "data", "sdxl", train={"batch_size": 4, "steps": 12})
    assert cfg.dataset.buckets is None  # SDXL's default: on

    # Every training forward: the batch's latent size and its time_ids rows.
    seen: list[tuple[tuple[int, int], list[tuple[int, ...]]]] = []
    forward = UNet2DConditionModel.forward

    def recording_forward(self, sample, *args, added_cond_kwargs=None, **kwargs):
        if torch.is_grad_enabled():  # training, not sampling
            seen.append((tuple(sample.shape[-2:]), [tuple(r) for r in added_cond_kwargs["time_ids"].round().int().tolist()]))
        return forward(self, sample, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    report, states = run(cfg)
    assert states == expect(**{s: R for s in STAGES})

    # The plan: each picture's latent has its bucket's size (over the VAE's downsampling factor).
    stored = {t["image"]: t for t in stored_latents(cfg, with_names=True)}
    factor = 32 // stored["red_square.png"]["latent"].shape[-1]
    for stem, bucket in EXPECTED.items():
        assert tuple(stored[f"{stem}.png"]["latent"].shape[-2:]) == (bucket[0] // factor, bucket[1] // factor), stem

    # No batch mixes buckets; every time_ids row is a stored latent's (original size, crop, bucket size).
    rows_by_size = {}
    for t in stored.values():
        size = tuple(t["latent"].shape[-2:])
        rows_by_size.setdefault(size, set()).add((*t["original_size"].tolist(), *t["crop_top_left"].tolist(),
                                                  size[0] * factor, size[1] * factor))
    assert len(seen) == 12 and len({size for size, _ in seen}) == 3  # all three buckets were trained on
    for size, rows in seen:
        assert set(rows) <= rows_by_size[size]
    # The 96x48 picture: original (h, w), resized to 48x24, cropped 4 px from the left, bucket (h, w).
    assert (48, 96, 0, 4, 24, 40) in rows_by_size[(24 // factor, 40 // factor)]

    # A new portrait picture: one latent encoded, in its bucket; train and sample re-run.
    write_pictures(tmp_path / "data", [("tall_yellow_square", (50, 100))])
    report, states = run(cfg)
    assert states == expect(captions=R, latents=R, train=R, sample=R)
    assert (row(report, "latents").computed, row(report, "latents").reused) == (1, len(PICTURES))

    # Buckets off: only the pictures whose cut changes (not the square ones) are encoded again.
    report, states = run(cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"buckets": False})}))
    assert states == expect(latents=R, train=R, sample=R)
    assert (row(report, "latents").computed, row(report, "latents").reused) == (5, 2)
