"""How the frozen base is held and the forward pass computed: the base's dtype, its quantization
(torchao through diffusers' `TorchAoConfig`) and accelerate's mixed precision; and the check, before
any task runs, that this machine can do what `train` asks.

A quantized base keeps its linear layers' weights in int8 or float8 (torchao tensor subclasses,
dequantized layer by layer in the forward pass) and everything else in `base_dtype`; peft puts its
`TorchaoLoraLinear` on those layers, and the LoRA trains in float32 as on any base. Autocast does not
reach those layers (a tensor subclass's linear runs before it), so `autocast_quantized` casts their
input and output as autocast casts a plain linear's.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from loraflow.config import TrainConfig

# `train.base_quantization` -> the torchao config diffusers' TorchAoConfig applies as the weights load.
QUANTIZATION = {"int8_weight_only": "Int8WeightOnlyConfig", "float8_weight_only": "Float8WeightOnlyConfig"}


def base_load_options(hp: TrainConfig) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments of the denoiser a run trains."""
    options: dict[str, Any] = {"torch_dtype": getattr(torch, hp.base_dtype)}
    if hp.base_quantization:
        import torchao.quantization
        from diffusers import TorchAoConfig

        options["quantization_config"] = TorchAoConfig(getattr(torchao.quantization, QUANTIZATION[hp.base_quantization])())
    return options


def autocast_quantized(model: torch.nn.Module) -> None:
    """Under autocast, each torchao-quantized linear of `model` computes and answers in the autocast
    dtype, as a plain linear does: without it an int8 layer answers in its input's dtype and a float8
    one in its weight's, and a float32 answer meeting a bfloat16 norm fails on a CPU."""
    from torchao.utils import TorchAOBaseTensor

    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and isinstance(module.weight, TorchAOBaseTensor):
            module.register_forward_pre_hook(_cast_input)
            module.register_forward_hook(_cast_output)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) and x.is_floating_point() else None


def _cast_input(module, args):
    dtype = _autocast_dtype(args[0])
    return (args[0].to(dtype), *args[1:]) if dtype else None


def _cast_output(module, args, output):
    dtype = _autocast_dtype(output)
    return output.to(dtype) if dtype else None


def check_precision(hp: TrainConfig, device: torch.device) -> None:
    """One clear error for a precision this machine or environment cannot train in."""
    if hp.mixed_precision == "fp16" and device.type == "cpu":
        # accelerate would quietly train in float32: on a CPU it runs neither fp16 autocast nor a GradScaler.
        raise ValueError("train.mixed_precision: fp16 needs a GPU (this run is on a CPU); use bf16 or no")
    if hp.base_quantization and importlib.util.find_spec("torchao") is None:
        raise ValueError(f"train.base_quantization: {hp.base_quantization} needs torchao: pip install 'loraflow[quant]'")
