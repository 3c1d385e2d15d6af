"""What `train` optimizes with: the optimizer, the learning-rate schedule and the EMA of the weights,
and how their state goes into a checkpoint.

The optimizer is torch's AdamW, bitsandbytes' 8-bit AdamW (CUDA only) or Prodigy (prodigyopt); the
schedule is diffusers' `get_scheduler`; the EMA is diffusers' `EMAModel`. A state dict becomes
safetensors tensors plus one JSON description of everything else (`flatten` / `unflatten`), so a
checkpoint holds no pickle and resuming restores the state exactly.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from loraflow.config import TrainConfig

# Schedules whose learning rate at a step depends on the run's length: a longer run is a different
# run from its first step, so it cannot resume from a shorter one's checkpoints.
LENGTH_DEPENDENT = {"linear", "cosine", "cosine_with_restarts", "polynomial"}


def make_optimizer(hp: TrainConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    if hp.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise ValueError(f"train.optimizer: adamw8bit (bitsandbytes) needs a CUDA GPU and this run is on "
                             f"{device.type}; use adamw or prodigy")
        try:
            import bitsandbytes
        except ImportError:
            raise ValueError("train.optimizer: adamw8bit needs bitsandbytes: pip install 'loraflow[gpu]'") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    if hp.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy estimates the step size itself; learning_rate scales it (1.0 is its default).
        return Prodigy(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {hp.optimizer!r}")


def make_schedule(hp: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return get_scheduler(hp.lr_scheduler, optimizer, num_warmup_steps=hp.lr_warmup_steps,
                         num_training_steps=hp.steps)


def make_ema(hp: TrainConfig, params: list[torch.nn.Parameter]) -> EMAModel | None:
    return EMAModel(params, decay=hp.ema_decay) if hp.ema_decay else None


# --- state as safetensors + JSON ---------------------------------------------------------------
def flatten(state: Any, prefix: str) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict as (tensors named `prefix.<path>`, JSON of the rest with each tensor's name).

    Dict keys keep their type (optimizer state is keyed by int), tuples come back as lists."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {"tensor": path}
        if isinstance(value, dict):
            return {"dict": [[k, walk(v, f"{path}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return {"list": [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        return {"value": value}

    return tensors, json.dumps(walk(state, prefix))


def unflatten(description: str, tensors: dict[str, torch.Tensor]) -> Any:
    def build(node: dict) -> Any:
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "dict" in node:
            return {k: build(v) for k, v in node["dict"]}
        if "list" in node:
            return [build(v) for v in node["list"]]
        return node["value"]

    return build(json.loads(description))
