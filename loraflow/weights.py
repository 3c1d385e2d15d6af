"""Trained weights as bytes: export from a training denoiser, import for resuming, apply for sampling.

LoRA weights are the file the family's pipeline writes with `save_lora_weights` (and reads with
`load_lora_weights`). diffusers' loaders know LoRA only, so LoHa and LoKr weights are peft's own:
the adapter's state dict (`get_peft_model_state_dict`, keys `<module>.hada_w1_a`, `<module>.lokr_w1`,
...) with its peft config as JSON in the safetensors header (`peft_config`), put back into a
denoiser with peft. Full fine-tuning weights are the denoiser's state dict.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from peft import PeftConfig
from peft.utils import PeftType, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraflow.families import Family
from loraflow.store import safetensors_metadata

LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_CONFIG = "peft_config"  # the header field holding a LoHa/LoKr file's peft config
PEFT_FILE_TYPES = {PeftType.LOHA, PeftType.LOKR}


def export_weights(family: Family, denoiser: torch.nn.Module, method: str) -> bytes:
    if method != "lora":
        return save_safetensors({k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()})
    config = denoiser.peft_config["default"]
    if config.peft_type == PeftType.LORA:
        return family.export_lora(denoiser)
    # peft keeps target modules as a set; sorted, the same weights give the same bytes.
    fields = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}
    return save_safetensors(state, metadata={"format": "pt", PEFT_CONFIG: json.dumps(fields, sort_keys=True)})


def import_weights(family: Family, denoiser: torch.nn.Module, method: str, data: bytes) -> None:
    """Exported weights back into the training denoiser (which has the adapter already): resuming."""
    if method != "lora":
        denoiser.load_state_dict(load_safetensors(data))
    elif peft_file_config(data) is None:
        family.import_lora(denoiser, data)
    else:
        _set_adapter_state(denoiser, data)


def apply_weights(pipe: DiffusionPipeline, family: Family, method: str, data: bytes) -> None:
    """Put trained weights into a pipeline the way a user would: `load_lora_weights` for LoRA,
    peft's adapter config and state dict for LoHa/LoKr."""
    denoiser = getattr(pipe, family.denoiser_folder)
    if method != "lora":
        denoiser.load_state_dict(load_safetensors(data))
        return
    config = peft_file_config(data)
    if config is None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / LORA_FILE).write_bytes(data)
            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # "no LoRA keys for text_encoder": there is none
            try:
                pipe.load_lora_weights(tmp, weight_name=LORA_FILE)
            finally:
                diffusers_logging.set_verbosity(level)
        return
    denoiser.add_adapter(config)
    _set_adapter_state(denoiser, data)
    denoiser.eval()  # the new adapter layers too: no rank or module dropout while sampling


def peft_file_config(data: bytes) -> PeftConfig | None:
    """The peft config in a LoHa/LoKr file's header; None for a diffusers LoRA file."""
    raw = safetensors_metadata(data).get(PEFT_CONFIG)
    if raw is None:
        return None
    fields = json.loads(raw)
    if fields.get("peft_type") not in PEFT_FILE_TYPES:
        raise ValueError(f"weights: peft_type {fields.get('peft_type')!r} in the file's header is not LOHA or LOKR")
    return PeftConfig.from_peft_type(**fields)


def _set_adapter_state(denoiser: torch.nn.Module, data: bytes) -> None:
    result = set_peft_model_state_dict(denoiser, load_safetensors(data))
    missing = [k for k in result.missing_keys if any(p in k for p in ("hada_", "lokr_"))]
    if result.unexpected_keys or missing:
        raise ValueError(f"adapter weights do not fit the denoiser: {(result.unexpected_keys or missing)[:3]}")
