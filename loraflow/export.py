"""`loraflow export`: a run's trained weights as a file to hand to other tools.

- `diffusers`: the LoRA exactly as stored: the file `save_lora_weights` writes and
  `load_lora_weights` reads (keys `unet.…` / `transformer.…`, peft's layout, with its adapter
  config in the header). ComfyUI loads it too. Full fine-tuning: the denoiser's state dict.
- `kohya`: the key format of sd-scripts, AUTOMATIC1111 / Forge and ComfyUI
  (`lora_unet_…​.lora_down.weight`, `.lora_up.weight`, `.alpha`), made with diffusers'
  `convert_state_dict_to_kohya`, with each module's real alpha (diffusers writes alpha = rank).
  For the UNet families (SD 1.x/2.x, SDXL): diffusers has no converter for the transformer
  families' kohya layouts (Flux's fused qkv), so those export as `diffusers`, which ComfyUI reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft.utils.other import get_pattern_key
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraflow.report import Report
from loraflow.store import Store, safetensors_metadata

FORMATS = ("kohya", "diffusers")
KOHYA_FAMILIES = {"sd": "unet", "sdxl": "unet"}  # family -> the prefix of its LoRA keys


class ExportError(ValueError):
    pass


def export(store: Store, report: Report, fmt: str) -> tuple[bytes, str]:
    """(the file's bytes, its suggested name) for the run's final weights in `fmt`."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if not report.weights:
        raise ExportError(f"run {report.flow_run_id} has no weights")
    rel = report.weights.removeprefix(store.url + "/")  # objects/<kind>/<xx>/<key>.<ext>
    kind, (key, ext) = rel.split("/")[1], rel.rsplit("/", 1)[-1].rsplit(".", 1)
    ref = store.find(kind, key, ext)
    if ref is None:
        raise ExportError(f"{report.weights} is missing or corrupt (deleted by `loraflow gc`?); run the flow again")
    data = store.read(ref)
    name = f"loraflow-{report.family}-{report.method}-{report.flow_run_id[:8]}-step{report.final_step}"
    if fmt == "diffusers":
        return data, f"{name}.safetensors"
    if report.method != "lora":
        raise ExportError("--format kohya: only LoRA weights have a kohya format; use --format diffusers")
    if report.family not in KOHYA_FAMILIES:
        raise ExportError(f"--format kohya: diffusers has no kohya converter for {report.family}; use --format "
                          "diffusers (ComfyUI loads it)")
    return to_kohya(data, KOHYA_FAMILIES[report.family]), f"{name}-kohya.safetensors"


def to_kohya(data: bytes, prefix: str) -> bytes:
    """diffusers/peft LoRA bytes -> kohya key format, alphas as trained."""
    tensors = load_safetensors(data)
    # diffusers keeps the adapter config in the header, each field prefixed with the component.
    raw = json.loads(safetensors_metadata(data).get("lora_adapter_metadata", "{}"))
    config = {k.removeprefix(prefix + "."): v for k, v in raw.items()}
    kohya = convert_state_dict_to_kohya(tensors)
    # diffusers writes alpha = rank (scale 1); the trained scale is lora_alpha / r per module.
    alpha, patterns = float(config.get("lora_alpha", 0) or 0), config.get("alpha_pattern") or {}
    modules = {k.removeprefix(prefix + ".").rsplit(".lora_A.", 1)[0] for k in tensors if ".lora_A." in k}
    for module in modules:
        kohya_module = "lora_" + prefix + "_" + module.replace(".", "_")
        key = get_pattern_key(patterns.keys(), module) if patterns else None
        value = patterns[key] if key in patterns else alpha
        if value:
            kohya[f"{kohya_module}.alpha"] = torch.tensor(float(value))
    return save_safetensors({k: v.contiguous() for k, v in sorted(kohya.items())},
                            metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(config.get("r", "")),
                                      "ss_network_alpha": str(alpha or ""), "loraflow_format": "kohya"})


def write(data: bytes, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp-export")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out
