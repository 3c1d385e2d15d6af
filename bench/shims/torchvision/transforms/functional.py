"""What transformers imports at module level once it sees a torchvision (`transformers.image_utils`);
the script's CLIP tokenizer and text encoder never call it."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(pic: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor, channels first, values unchanged (torchvision's pil_to_tensor)."""
    array = np.array(pic, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
