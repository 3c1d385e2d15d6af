"""The transforms diffusers' train_text_to_image_lora.py uses, on PIL images, as torchvision's PIL path
does them (torchvision.transforms v1): the same output sizes, crop offsets, random draws (torch's
generator), resampling filters and value ranges. Nothing else of torchvision is provided.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum

import numpy as np
import torch
from PIL import Image


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.NEAREST_EXACT: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a one- or two-element sequence."""
    if isinstance(size, int):
        return size, size
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


class Compose:
    def __init__(self, transforms: list[Callable]):
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


class Lambda:
    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, img):
        return self.fn(img)


class Resize:
    """An int: the shorter side becomes `size`, the longer keeps the aspect ratio (truncated)."""

    def __init__(self, size: int | Sequence[int], interpolation=InterpolationMode.BILINEAR, antialias=True):
        self.size, self.interpolation = size, InterpolationMode(interpolation)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if isinstance(self.size, int) or len(self.size) == 1:
            short = self.size if isinstance(self.size, int) else self.size[0]
            (small, large) = (w, h) if w <= h else (h, w)
            new_small, new_large = short, int(short * large / small)
            new_w, new_h = (new_small, new_large) if w <= h else (new_large, new_small)
        else:
            new_h, new_w = self.size
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), PIL_FILTERS[self.interpolation])


class CenterCrop:
    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        (th, tw), (w, h) = self.size, img.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))


class RandomCrop:
    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        (th, tw), (w, h) = self.size, img.size
        if h < th or w < tw:
            raise ValueError(f"Required crop size {(th, tw)} is larger than input image size {(h, w)}")
        if (h, w) == (th, tw):
            return img
        top = torch.randint(0, h - th + 1, size=(1,)).item()
        left = torch.randint(0, w - tw + 1, size=(1,)).item()
        return img.crop((left, top, left + tw, top + th))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1) < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class ToTensor:
    """PIL image (8-bit) -> float32 tensor, channels first, in [0, 1]."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        array = np.array(img, dtype=np.uint8, copy=True)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False):
        self.mean, self.std = mean, std

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return (tensor - mean) / std
