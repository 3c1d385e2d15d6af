"""Stable Diffusion XL: SD's UNet objective plus two CLIP encoders, a pooled embedding and micro-conditioning.

Text: `StableDiffusionXLPipeline.encode_prompt` (both encoders' penultimate hidden states concatenated;
the pooled projection of the second). Micro-conditioning: `time_ids = original_size + crop_top_left +
target_size` per latent, as the pipeline's `_get_add_time_ids` builds them, from the size and crop
stored with each cached latent. Null embedding: the empty prompt, encoded (what SDXL's trainer uses
for dropped captions; the pipeline's zeros apply only when no negative prompt is given at all).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from loraflow.families.base import DTYPES, Cond, with_pooled
from loraflow.families.sd import StableDiffusion, add_noise, draw_timesteps_and_noise, noise_prediction_loss


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    buckets_by_default = True
    text_folders = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    default_max_length = 77

    def load_text_encoder(self, model_dir, settings, device):
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, unet=None, vae=None, scheduler=None,
                                                         dtype=DTYPES[settings.dtype], add_watermarker=False)
        for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):  # encode_prompt pads to model_max_length
            tokenizer.model_max_length = settings.max_length or self.default_max_length
        return pipe.to(device)

    def encode(self, text_encoder, prompts, settings):
        prompts = [(settings.instruction or "") + p for p in prompts]
        with torch.no_grad():
            embeds, _, pooled, _ = text_encoder.encode_prompt(prompts, do_classifier_free_guidance=False)
        return [{"prompt_embeds": e.cpu(), "pooled_prompt_embeds": p.cpu()} for e, p in zip(embeds, pooled)]

    def load_noise_schedule(self, model_dir):
        # time_ids' target size is in pixels: the latent's size times the VAE's downsampling.
        return super().load_noise_schedule(model_dir), self.vae_scale_factor(model_dir)

    def draw_noise(self, schedule, shape, generator, hp):
        return draw_timesteps_and_noise(schedule[0], shape, generator, hp)

    def training_loss(self, denoiser, schedule, batch, cond, draws, hp):
        scheduler, vae_scale_factor = schedule
        latents = batch["latent"]
        noisy, t, target = add_noise(scheduler, latents, draws)
        pred = denoiser(noisy, t, encoder_hidden_states=cond["prompt_embeds"],
                        added_cond_kwargs=self.added_cond(batch, cond, vae_scale_factor)).sample
        return noise_prediction_loss(scheduler, pred, target, t, hp)

    @staticmethod
    def added_cond(batch, cond, vae_scale_factor: int) -> dict[str, torch.Tensor]:
        latents = batch["latent"]
        target_size = torch.tensor(latents.shape[-2:], device=latents.device) * vae_scale_factor
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"],
                              target_size.expand(latents.shape[0], 2)], dim=1)
        return {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids.to(latents.dtype)}

    def pipeline(self, model_dir, denoiser, vae):
        scheduler = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        return StableDiffusionXLPipeline(
            vae=vae, unet=denoiser, scheduler=scheduler, text_encoder=None, text_encoder_2=None,
            tokenizer=None, tokenizer_2=None, add_watermarker=False,
        )

    def generate(self, pipe, cond: Cond, null: Cond, settings, size, generator):
        return pipe(
            **with_pooled(cond, null),
            guidance_scale=settings.guidance_scale, num_inference_steps=settings.steps,
            height=size, width=size, generator=generator,
        ).images[0]
