"""`loraflow export`: a run's trained weights as a file to hand to other tools.

- `diffusers`: the LoRA exactly as stored: the file `save_lora_weights` writes and
  `load_lora_weights` reads (keys `unet.…` / `transformer.…`, peft's layout, with its adapter
  config in the header). ComfyUI loads it too. Full fine-tuning: the denoiser's state dict.
- `kohya`: the key format of sd-scripts, AUTOMATIC1111 / Forge and ComfyUI (`lora_unet_…​.lora_down.weight`,
  `.lora_up.weight`, `.alpha`), with each module's trained alpha (diffusers writes alpha = rank).
  SD 1.x/2.x and SDXL: diffusers' `convert_state_dict_to_kohya`. Flux: sd-scripts' `networks/lora_flux.py`
  names (Black Forest Labs' checkpoint layout, `FLUX_KOHYA`), whose fused modules (qkv, a single
  block's linear1 = q, k, v and the MLP's input) stack their parts' down matrices over one
  block-diagonal up matrix, as sd-scripts writes them and diffusers' `_convert_kohya_flux_lora_to_diffusers`
  splits them back; their parts must share one scale (alpha / rank). ComfyUI and Forge apply every
  module; diffusers 0.42 reads the blocks back at FLUX.1's widths only (it assumes 3072 for
  linear1) and drops the modules outside them (`img_in`, `final_layer`, …: `all_linear` LoRAs).
  Other families have no kohya layout here: `diffusers` (ComfyUI loads it).
  LoHa and LoKr (`train.adapter`): `diffusers` is the stored peft file (state dict, peft config in
  the header); `kohya` (SD 1.x/2.x, SDXL) is LyCORIS' layout of the same tensors
  (`lora_unet_….hada_w1_a`, `.lokr_w1`, …, `.alpha`), which ComfyUI, A1111 and Forge load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft.utils.other import get_pattern_key
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraflow.report import Report
from loraflow.store import Store, safetensors_metadata
from loraflow.weights import peft_file_config

FORMATS = ("kohya", "diffusers")


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
    adapter = peft_file_config(data)  # LoHa/LoKr; None for LoRA and full fine-tuning weights
    kind = adapter.peft_type.lower() if adapter else report.method
    name = f"loraflow-{report.family}-{kind}-{report.flow_run_id[:8]}-step{report.final_step}"
    if fmt == "diffusers":
        return data, f"{name}.safetensors"
    if report.method != "lora":
        raise ExportError("--format kohya: only LoRA weights have a kohya format; use --format diffusers")
    if adapter:
        if report.family not in LYCORIS_KOHYA:
            raise ExportError(f"--format kohya: no kohya layout for {report.family} {kind} weights; use --format "
                              "diffusers")
        return lycoris_to_kohya(data, "unet"), f"{name}-kohya.safetensors"
    if report.family not in KOHYA:
        raise ExportError(f"--format kohya: no kohya layout for {report.family}; use --format diffusers "
                          "(ComfyUI loads it)")
    return KOHYA[report.family](data), f"{name}-kohya.safetensors"


def read_lora(data: bytes, prefix: str) -> tuple[dict[str, torch.Tensor], dict, dict[str, float]]:
    """The stored LoRA's tensors, its adapter config and each module's trained alpha (its rank if not recorded)."""
    tensors = load_safetensors(data)
    # diffusers keeps the adapter config in the header, each field prefixed with the component.
    raw = json.loads(safetensors_metadata(data).get("lora_adapter_metadata", "{}"))
    config = {k.removeprefix(prefix + "."): v for k, v in raw.items()}
    # diffusers writes alpha = rank (scale 1); the trained scale is lora_alpha / r per module.
    alpha, patterns = float(config.get("lora_alpha", 0) or 0), config.get("alpha_pattern") or {}
    alphas = {}
    for name, down in sorted(tensors.items()):
        if ".lora_A." in name:
            module = name.removeprefix(prefix + ".").rsplit(".lora_A.", 1)[0]
            alphas[module] = float(_per_module(patterns, module, alpha or float(down.shape[0])))
    return tensors, config, alphas


def kohya_file(kohya: dict[str, torch.Tensor], network_module: str, config: dict) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in sorted(kohya.items())},
                            metadata={"ss_network_module": network_module, "ss_network_dim": str(config.get("r", "")),
                                      "ss_network_alpha": str(config.get("lora_alpha", "") or ""),
                                      "loraflow_format": "kohya"})


def unet_to_kohya(data: bytes) -> bytes:
    """SD 1.x/2.x, SDXL: diffusers' converter (`lora_unet_down_blocks_…`), with the trained alphas."""
    tensors, config, alphas = read_lora(data, "unet")
    kohya = convert_state_dict_to_kohya(tensors)
    for module, alpha in alphas.items():
        kohya[f"lora_unet_{module.replace('.', '_')}.alpha"] = torch.tensor(alpha)
    return kohya_file(kohya, "networks.lora", config)


# sd-scripts' Flux modules (named after Black Forest Labs' checkpoint) and the diffusers modules each is
# made of, in the order of its output rows; {i} is a block number.
_D, _S = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
FLUX_KOHYA = {
    "double_blocks_{i}_img_attn_qkv": (_D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v"),
    "double_blocks_{i}_img_attn_proj": (_D + "attn.to_out.0",),
    "double_blocks_{i}_img_mlp_0": (_D + "ff.net.0.proj",),
    "double_blocks_{i}_img_mlp_2": (_D + "ff.net.2",),
    "double_blocks_{i}_img_mod_lin": (_D + "norm1.linear",),
    "double_blocks_{i}_txt_attn_qkv": (_D + "attn.add_q_proj", _D + "attn.add_k_proj", _D + "attn.add_v_proj"),
    "double_blocks_{i}_txt_attn_proj": (_D + "attn.to_add_out",),
    "double_blocks_{i}_txt_mlp_0": (_D + "ff_context.net.0.proj",),
    "double_blocks_{i}_txt_mlp_2": (_D + "ff_context.net.2",),
    "double_blocks_{i}_txt_mod_lin": (_D + "norm1_context.linear",),
    "single_blocks_{i}_linear1": (_S + "attn.to_q", _S + "attn.to_k", _S + "attn.to_v", _S + "proj_mlp"),
    "single_blocks_{i}_linear2": (_S + "proj_out",),
    "single_blocks_{i}_modulation_lin": (_S + "norm.linear",),
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in_in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in_out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in_in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in_out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in_in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in_out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer_linear": ("proj_out",),
    "final_layer_adaLN_modulation_1": ("norm_out.linear",),
}
FLUX_PART = {part: (kohya, j) for kohya, parts in FLUX_KOHYA.items() for j, part in enumerate(parts)}
FLUX_MLP_RATIO = 4  # proj_mlp's width in model widths (for the zeros of a fused part without LoRA)


def flux_to_kohya(data: bytes) -> bytes:
    tensors, config, alphas = read_lora(data, "transformer")
    if extra := sorted(k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))):
        raise ExportError(f"--format kohya: sd-scripts' LoRA has no {extra[0]} (DoRA?); use --format diffusers")
    fused: dict[tuple[str, str], dict[int, str]] = {}  # (sd-scripts module, block) -> {part: diffusers module}
    for module in alphas:
        block = re.search(r"blocks\.(\d+)\.", module)
        template = module.replace(block.group(0), "blocks.{i}.") if block else module
        if template not in FLUX_PART:
            raise ExportError(f"--format kohya: sd-scripts' Flux LoRA has no module for {module}; "
                              "use --format diffusers")
        kohya, j = FLUX_PART[template]
        fused.setdefault((kohya, block.group(1) if block else ""), {})[j] = module
    out = {}
    for (template, i), present in sorted(fused.items()):
        name = "lora_unet_" + template.format(i=i)
        rank, width = tensors[f"transformer.{present[min(present)]}.lora_A.weight"].shape
        scales = {m: alphas[m] / tensors[f"transformer.{m}.lora_A.weight"].shape[0] for m in present.values()}
        if len(set(scales.values())) > 1:
            raise ExportError(f"--format kohya: {name} fuses {', '.join(scales)}, whose LoRA scales (alpha / rank: "
                              f"{', '.join(f'{s:g}' for s in scales.values())}) differ, and sd-scripts' format has one "
                              "per module; train them with one alpha / rank or use --format diffusers")
        downs, ups = [], []
        for j, part in enumerate(FLUX_KOHYA[template]):
            if j in present:
                downs.append(tensors[f"transformer.{present[j]}.lora_A.weight"])
                ups.append(tensors[f"transformer.{present[j]}.lora_B.weight"])
            else:  # a part without LoRA: zeros
                downs.append(torch.zeros(rank, width))
                ups.append(torch.zeros(width * (FLUX_MLP_RATIO if part.endswith("proj_mlp") else 1), rank))
        up = torch.block_diag(*ups)  # part j's rows only see part j's down rows
        if template == "final_layer_adaLN_modulation_1":  # diffusers' (scale, shift) rows -> BFL's (shift, scale)
            up = torch.cat(up.chunk(2)[::-1])
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = torch.cat(downs), up
        out[f"{name}.alpha"] = torch.tensor(alphas[present[min(present)]] / rank * sum(d.shape[0] for d in downs))
    return kohya_file(out, "networks.lora_flux", config)

KOHYA = {"sd": unet_to_kohya, "sdxl": unet_to_kohya, "flux": flux_to_kohya}  # family -> its kohya converter
LYCORIS_KOHYA = {"sd", "sdxl"}  # families whose LoHa/LoKr export as LyCORIS' kohya keys (Flux's fused ones cannot)


def lycoris_to_kohya(data: bytes, prefix: str) -> bytes:
    """peft LoHa/LoKr bytes -> LyCORIS' kohya-style keys. peft's tensors are LyCORIS' own (same
    names, shapes and products), so each module's keys are renamed and its alpha added: LyCORIS
    scales a module's update by alpha / rank as peft does, except a LoKr module with no low-rank
    factor (`lokr_w1` and `lokr_w2` both whole), which it leaves unscaled; that scale is put into
    `lokr_w1` instead."""
    tensors, config = load_safetensors(data), peft_file_config(data)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, param = key.rsplit(".", 1)
        by_module.setdefault(module, {})[param] = value
    kohya = {}
    for module, params in by_module.items():
        name = "lora_" + prefix + "_" + module.replace(".", "_")
        alpha = _per_module(config.alpha_pattern, module, config.alpha)
        if "lokr_w1" in params and "lokr_w2" in params:
            params["lokr_w1"] = params["lokr_w1"] * (alpha / _per_module(config.rank_pattern, module, config.r))
        else:
            kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
        kohya |= {f"{name}.{param}": value for param, value in params.items()}
    return save_safetensors({k: v.contiguous() for k, v in sorted(kohya.items())},
                            metadata={"ss_network_module": "lycoris.kohya", "loraflow_format": "kohya",
                                      "ss_network_args": json.dumps({"algo": config.peft_type.lower()})})


def _per_module(patterns: dict, module: str, default: float) -> float:
    """A rank or alpha as peft gives `module`: its pattern's value, else the default."""
    key = get_pattern_key(patterns.keys(), module) if patterns else None
    return patterns[key] if key in patterns else default


def write(data: bytes, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp-export")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out
