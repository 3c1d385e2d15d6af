"""Trained weights as bytes: export from a training denoiser, import for resuming, apply for sampling.

LoRA weights are the file the family's pipeline writes with `save_lora_weights` (and reads with
`load_lora_weights`); full fine-tuning weights are the denoiser's state dict as safetensors.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraflow.families import Family

LORA_FILE = "pytorch_lora_weights.safetensors"


def export_weights(family: Family, denoiser: torch.nn.Module, method: str) -> bytes:
    if method == "lora":
        return family.export_lora(denoiser)
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()})


def import_weights(family: Family, denoiser: torch.nn.Module, method: str, data: bytes) -> None:
    if method == "lora":
        family.import_lora(denoiser, data)
    else:
        denoiser.load_state_dict(load_safetensors(data))


def apply_weights(pipe: DiffusionPipeline, family: Family, method: str, data: bytes) -> None:
    """Put trained weights into a pipeline the way a user would: `load_lora_weights` for LoRA."""
    if method == "lora":
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / LORA_FILE).write_bytes(data)
            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # "no LoRA keys for text_encoder": there is none
            try:
                pipe.load_lora_weights(tmp, weight_name=LORA_FILE)
            finally:
                diffusers_logging.set_verbosity(level)
    else:
        getattr(pipe, family.denoiser_folder).load_state_dict(load_safetensors(data))
