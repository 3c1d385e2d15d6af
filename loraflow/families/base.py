"""What a model family must say, and nothing more.

The five tasks are written once against this interface; every family difference (how a prompt is
encoded, what the null embedding is, latent scaling, the training objective, LoRA targets, how to
sample) lives in that family's module. Families differ in how many tensors `encode` returns per
prompt (pooled embeddings, masks), which `training_loss` and `generate` read back by name.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load as load_safetensors

from loraflow.config import EncoderConfig, SamplerSettings, TrainConfig

Cond = dict[str, torch.Tensor]  # one prompt's embedding tensors, e.g. {"prompt_embeds": (L, D)}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Family:
    name: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    denoiser_folder: ClassVar[str]  # "unet" or "transformer": subfolder and LoRA prefix
    text_folders: ClassVar[tuple[str, ...]]
    vae_folders: ClassVar[tuple[str, ...]] = ("vae",)
    lora_targets: ClassVar[list[str]]  # attention layers (the default preset)
    mlp_targets: ClassVar[list[str]]  # added by the attention_mlp preset
    # Objective options (in `TrainConfig`) this family's `training_loss` reads; the others must stay
    # at their defaults (a set one would change the key and nothing else).
    objective_options: ClassVar[frozenset[str]] = frozenset()
    default_max_length: ClassVar[int]
    buckets_by_default: ClassVar[bool] = False  # aspect-ratio buckets unless `dataset.buckets` says

    @property
    def denoiser_folders(self) -> tuple[str, ...]:
        return (self.denoiser_folder, "scheduler")

    # --- text -----------------------------------------------------------------------------------
    def load_text_encoder(self, model_dir: str, settings: EncoderConfig, device: torch.device) -> Any:
        raise NotImplementedError

    def encode(self, text_encoder: Any, prompts: list[str], settings: EncoderConfig) -> list[Cond]:
        """One embedding dict per prompt, unbatched, padded to the max length, on the CPU."""
        raise NotImplementedError

    def null_embedding(self, text_encoder: Any, settings: EncoderConfig) -> Cond:
        """The unconditional embedding used for guidance and caption dropout: the empty prompt."""
        return self.encode(text_encoder, [""], settings)[0]

    # --- latents --------------------------------------------------------------------------------
    def vae_scale_factor(self, model_dir: str) -> int:
        """Pixels per latent along each side, as the family's pipeline computes it from the VAE."""
        return 2 ** (len(AutoencoderKL.load_config(model_dir, subfolder="vae")["block_out_channels"]) - 1)

    def resolution_multiple(self, model_dir: str) -> int:
        """What `dataset.resolution` must be a multiple of for the family's pipeline to sample at
        it (its `check_inputs`) and for training latents to have the shape sampling makes."""
        raise NotImplementedError

    # A KL VAE unless the family says otherwise; its distribution's mode, so latents are deterministic.
    def load_vae(self, model_dir: str, device: torch.device) -> torch.nn.Module:
        return AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(device).eval()

    def encode_images(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> normalised latents on the CPU, deterministically."""
        with torch.no_grad():
            latents = vae.encode(on_weights(pixels, vae)).latent_dist.mode().cpu()
        shift = vae.config.shift_factor or 0.0
        return (latents - shift) * vae.config.scaling_factor

    # --- training -------------------------------------------------------------------------------
    def load_denoiser(self, model_dir: str, torch_dtype: torch.dtype = torch.float32, **options: Any) -> torch.nn.Module:
        """The denoiser, from its `from_pretrained` with these options (e.g. quantization_config)."""
        raise NotImplementedError

    def load_noise_schedule(self, model_dir: str) -> Any:
        raise NotImplementedError

    def draw_noise(self, schedule: Any, shape: torch.Size, generator: torch.Generator,
                   hp: TrainConfig) -> dict[str, torch.Tensor]:
        """The objective's random draws for a batch of latents of `shape` (noise, timesteps), on the
        CPU from `generator`, each with one row per latent. Drawn apart from the loss so that
        data-parallel ranks draw for the whole batch and each takes its own rows: N processes train
        as one would on their combined batch."""
        raise NotImplementedError

    def training_loss(self, denoiser: torch.nn.Module, schedule: Any, batch: dict[str, torch.Tensor],
                      cond: Cond, draws: dict[str, torch.Tensor], hp: TrainConfig) -> torch.Tensor:
        """batch: "latent" (B, C, h, w), "original_size" and "crop_top_left" (B, 2) as cached; cond:
        `encode`'s tensors stacked; draws: `draw_noise`'s rows for this batch, on its device; hp:
        the objective's options (timestep weighting, guidance)."""
        raise NotImplementedError

    def check_train(self, hp: TrainConfig) -> None:
        """One clear error for an objective option this family has not got (before any task runs)."""
        defaults = TrainConfig()
        for name in sorted(OBJECTIVE_OPTIONS - self.objective_options):
            if getattr(hp, name) != getattr(defaults, name):
                users = sorted(f.name for f in _families() if name in f.objective_options)
                raise ValueError(f"train.{name}: the {self.name} family's objective has no such option "
                                 f"(it applies to {', '.join(users)})")
        if hp.method == "full" and (hp.lora_targets != "attention" or hp.rank_pattern or hp.alpha_pattern or hp.use_dora
                                    or hp.adapter != "lora"):
            raise ValueError("train.lora_targets, rank_pattern, alpha_pattern, use_dora and adapter apply to method: lora")

    def lora_target_modules(self, denoiser: torch.nn.Module, preset: str) -> list[str]:
        """peft `target_modules` for a `train.lora_targets` preset."""
        if preset == "attention":
            return list(self.lora_targets)
        if preset == "attention_mlp":
            return [*self.lora_targets, *self.mlp_targets]
        if preset == "all_linear":
            return sorted(name for name, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear))
        if preset == "conv":
            convs = sorted(name for name, m in denoiser.named_modules()
                           if isinstance(m, torch.nn.Conv2d) and ".resnets." in name)
            if not convs:
                raise ValueError(f"train.lora_targets: conv: the {self.name} denoiser has no resnet convolutions")
            return [*self.lora_targets, *self.mlp_targets, *convs]
        raise ValueError(f"train.lora_targets: unknown preset {preset!r}")

    def add_lora(self, denoiser: torch.nn.Module, hp: TrainConfig) -> None:
        """The `train.adapter` (LoRA, LoHa or LoKr) on the denoiser's target layers, through peft."""
        denoiser.add_adapter(adapter_config(hp, self.lora_target_modules(denoiser, hp.lora_targets)))

    def export_lora(self, denoiser: torch.nn.Module) -> bytes:
        """The LoRA as the bytes of the file the family's pipeline `load_lora_weights` reads."""
        config = denoiser.peft_config["default"].to_dict()
        # peft keeps target modules as a set; sort them so the same weights give the same bytes.
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        with tempfile.TemporaryDirectory() as tmp:
            self.pipeline_class.save_lora_weights(tmp, **{
                f"{self.denoiser_folder}_lora_layers": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(denoiser).items()},
                f"{self.denoiser_folder}_lora_adapter_metadata": config,
            })
            return (Path(tmp) / "pytorch_lora_weights.safetensors").read_bytes()

    def import_lora(self, denoiser: torch.nn.Module, data: bytes) -> None:
        """Inverse of `export_lora` on a denoiser that already has the adapter (for resuming)."""
        prefix = self.denoiser_folder + "."
        state = {k[len(prefix):]: v for k, v in load_safetensors(data).items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(denoiser, state)
        if result.unexpected_keys:
            raise ValueError(f"LoRA weights do not fit the denoiser: {result.unexpected_keys[:3]}")

    # --- sampling -------------------------------------------------------------------------------
    def pipeline(self, model_dir: str, denoiser: torch.nn.Module, vae: torch.nn.Module) -> DiffusionPipeline:
        """The family's diffusers pipeline without text encoders: sampling reads cached embeddings."""
        raise NotImplementedError

    def generate(self, pipe: DiffusionPipeline, cond: Cond, null: Cond, settings: SamplerSettings,
                 size: int, generator: torch.Generator) -> Image.Image:
        raise NotImplementedError



def adapter_config(hp: TrainConfig, target_modules: list[str]) -> PeftConfig:
    """peft's config for `hp.adapter`: rank, alpha, the patterns and targets as one, then each
    adapter's own options (LoRA with diffusers' trainers' gaussian init; LoHa and LoKr with peft's)."""
    common = dict(r=hp.rank, target_modules=target_modules, rank_pattern=hp.rank_pattern, alpha_pattern=hp.alpha_pattern)
    if hp.adapter == "lora":
        return LoraConfig(lora_alpha=hp.alpha, init_lora_weights="gaussian", use_dora=hp.use_dora, **common)
    lycoris = dict(alpha=hp.alpha, rank_dropout=hp.rank_dropout, module_dropout=hp.module_dropout,
                   use_effective_conv2d=hp.use_effective_conv2d, **common)
    if hp.adapter == "loha":
        return LoHaConfig(**lycoris)
    return LoKrConfig(decompose_both=hp.decompose_both, decompose_factor=hp.decompose_factor, **lycoris)


# Options of one kind of training objective or another (`Family.objective_options`).
OBJECTIVE_OPTIONS = frozenset({"snr_gamma", "noise_offset", "precondition_outputs"})


def _families():
    from loraflow.families import FAMILIES

    return FAMILIES.values()


def with_pooled(cond: Cond, null: Cond) -> dict[str, torch.Tensor]:
    """A prompt's and the null embedding's hidden states and pooled vectors, as the keyword
    arguments (batch of one) the SDXL, SD3 and Flux pipelines take for guided sampling."""
    return {
        "prompt_embeds": cond["prompt_embeds"][None], "pooled_prompt_embeds": cond["pooled_prompt_embeds"][None],
        "negative_prompt_embeds": null["prompt_embeds"][None],
        "negative_pooled_prompt_embeds": null["pooled_prompt_embeds"][None],
    }


def on_weights(inputs: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """`inputs` on the device and in the dtype of `model`'s first weight. Not diffusers' `model.device`
    and `model.dtype`: they walk every submodule looking for offload and casting hooks (which the
    encoders loaded here never carry), 8% of the tiny VAE's time per batch on a CPU."""
    weight = next(model.parameters())
    return inputs.to(weight.device, weight.dtype)
