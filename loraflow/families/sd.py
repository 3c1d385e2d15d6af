"""Stable Diffusion 1.x / 2.x: UNet, one CLIP text encoder, KL VAE, epsilon or v-prediction.

Null embedding: the empty prompt padded to the max length and encoded (what the pipeline does for
classifier-free guidance when no negative prompt is given).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from transformers import AutoTokenizer, CLIPTextModel

from loraflow.config import TrainConfig
from loraflow.families.base import DTYPES, Cond, Family


class StableDiffusion(Family):
    name = "sd"
    pipeline_class = StableDiffusionPipeline
    denoiser_folder = "unet"
    text_folders = ("text_encoder", "tokenizer")
    lora_targets = ["to_k", "to_q", "to_v", "to_out.0"]
    mlp_targets = ["ff.net.0.proj", "ff.net.2"]
    objective_options = frozenset({"snr_gamma", "noise_offset"})
    default_max_length = 77

    def load_text_encoder(self, model_dir, settings, device):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=DTYPES[settings.dtype])
        return tokenizer, encoder.to(device).eval()

    def encode(self, text_encoder, prompts, settings):
        tokenizer, encoder = text_encoder
        max_length = settings.max_length or self.default_max_length
        prompts = [(settings.instruction or "") + p for p in prompts]
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            embeds = encoder(ids.to(encoder.device))[0]
        return [{"prompt_embeds": e.cpu()} for e in embeds]

    def resolution_multiple(self, model_dir):
        # check_inputs wants height % 8; the VAE needs whole latent pixels (8 for real models too).
        return math.lcm(8, self.vae_scale_factor(model_dir))

    def load_denoiser(self, model_dir, torch_dtype=torch.float32, **options):
        return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch_dtype, **options)

    def load_noise_schedule(self, model_dir):
        return DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")

    def draw_noise(self, schedule, shape, generator, hp):
        return draw_timesteps_and_noise(schedule, shape, generator, hp)

    def training_loss(self, denoiser, schedule, batch, cond, draws, hp):
        noisy, t, target = add_noise(schedule, batch["latent"], draws)
        pred = denoiser(noisy, t, encoder_hidden_states=cond["prompt_embeds"]).sample
        return noise_prediction_loss(schedule, pred, target, t, hp)

    def pipeline(self, model_dir, denoiser, vae):
        scheduler = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        return StableDiffusionPipeline(
            vae=vae, unet=denoiser, scheduler=scheduler, text_encoder=None, tokenizer=None,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def generate(self, pipe, cond: Cond, null: Cond, settings, size, generator):
        return pipe(
            prompt_embeds=cond["prompt_embeds"][None], negative_prompt_embeds=null["prompt_embeds"][None],
            guidance_scale=settings.guidance_scale, num_inference_steps=settings.steps,
            height=size, width=size, generator=generator,
        ).images[0]


def draw_timesteps_and_noise(scheduler, shape: torch.Size, generator: torch.Generator,
                             hp: TrainConfig) -> dict[str, torch.Tensor]:
    """Noise and a uniformly drawn training timestep per latent, from the CPU generator (its state
    is checkpointed)."""
    noise = torch.randn(shape, generator=generator)
    if hp.noise_offset:  # one offset per latent channel, as diffusers' and kohya's trainers add it
        noise = noise + hp.noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (shape[0],), generator=generator)
    return {"noise": noise, "t": t}


def add_noise(scheduler, latents: torch.Tensor, draws: dict[str, torch.Tensor]):
    """(noisy latents, timesteps, target) for the drawn noise and timesteps."""
    noise, t = draws["noise"], draws["t"]
    noisy = scheduler.add_noise(latents, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, t, scheduler.get_velocity(latents, noise, t)
    return noisy, t, noise


def noise_prediction_loss(scheduler, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                          hp: TrainConfig) -> torch.Tensor:
    """Mean squared error, weighted per sample by min-SNR-gamma when `hp.snr_gamma` is set
    (Hang et al. 2023, as diffusers' trainers compute it: min(SNR, gamma) / SNR for epsilon, and
    / (SNR + 1) for v-prediction)."""
    if hp.snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    snr = compute_snr(scheduler, t)
    weight = snr.clamp(max=hp.snr_gamma)
    weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * weight.float()).mean()
