"""Aspect-ratio buckets: the sizes images are cut to when they are not all cut square.

The buckets are every (height, width) with sides multiples of `step` between `min_side` and
`max_side` and about `resolution²` pixels (never more), as kohya's sd-scripts makes them. Each
image goes to the bucket whose aspect ratio is nearest its own (the larger bucket on a tie), so the
plan depends only on image sizes, which depend only on image bytes. Training batches never mix
buckets.
"""

from __future__ import annotations

import math

from loraflow.config import DatasetConfig

Size = tuple[int, int]  # (height, width) in pixels


def bucket_sizes(resolution: int, step: int, min_side: int | None = None, max_side: int | None = None) -> list[Size]:
    """Every bucket, sorted; `min_side` / `max_side` default to half and twice the resolution."""
    low = max(step, (min_side or resolution // 2) // step * step)
    high = (max_side or resolution * 2) // step * step
    area = resolution * resolution
    sizes = {(resolution // step * step,) * 2}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            sizes |= {(height, width), (width, height)}
    return sorted(s for s in sizes if s[0] * s[1] <= area)


def pick_bucket(height: int, width: int, sizes: list[Size]) -> Size:
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[1] / s[0]) - ratio), -s[0] * s[1], s))


def plan_buckets(cfg: DatasetConfig, default: bool, multiple: int) -> list[Size] | None:
    """The run's buckets (None: every image is cut square), checked against the family's size
    multiple (`Family.resolution_multiple`)."""
    if not (default if cfg.buckets is None else cfg.buckets):
        return None
    if cfg.bucket_step % multiple:
        raise ValueError(f"dataset.bucket_step: {cfg.bucket_step} is not a multiple of {multiple}, which this "
                         f"model's sizes must be")
    sizes = bucket_sizes(cfg.resolution, cfg.bucket_step, cfg.bucket_min_side, cfg.bucket_max_side)
    if len(sizes) < 2 or cfg.bucket_step > cfg.resolution:
        raise ValueError(f"dataset.bucket_step: {cfg.bucket_step} leaves no aspect-ratio buckets at resolution "
                         f"{cfg.resolution}; lower it, or set dataset.buckets: false")
    return sizes


def cut_size(height: int, width: int, resolution: int, buckets: list[Size] | None) -> Size:
    """What an image of this (upright) size is cut to."""
    return pick_bucket(height, width, buckets) if buckets else (resolution, resolution)
