"""Model families, one module each, behind the interface in `base`."""

import threading

import torch
from accelerate import PartialState

from loraflow.families.base import Cond, Family
from loraflow.families.flux import Flux
from loraflow.families.sana import Sana
from loraflow.families.sd import StableDiffusion
from loraflow.families.sd3 import StableDiffusion3
from loraflow.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {
    f.name: f for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux(), Sana())
}


_LOADING = threading.Lock()


def loaded(load, *args):
    """`load(*args)`, one model at a time per process. diffusers and transformers build a model on
    the meta device by patching torch for the whole process (accelerate's `init_empty_weights`), so
    a model another thread loads at the same moment (shards run in threads) would come out empty."""
    with _LOADING:
        return load(*args)


def pick_device() -> torch.device:
    """The device accelerate picks (a GPU when there is one). The first call in a process sets up
    accelerate's process-wide state, which two threads must not do at once (shards run in threads)."""
    with _LOADING:
        return PartialState().device


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model.family: unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


__all__ = ["Cond", "Family", "FAMILIES", "loaded", "pick_device", "get_family"]
