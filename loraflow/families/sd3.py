"""Stable Diffusion 3: MMDiT transformer, two CLIP encoders plus T5, pooled embeddings, flow matching.

Text: `StableDiffusion3Pipeline.encode_prompt` (CLIP hidden states concatenated and zero-padded to
T5's width, then T5's tokens appended; pooled = both CLIPs' projections); `max_length` is the T5
length (the CLIP part is always 77). No T5 mask, as in the pipeline. Null embedding: the empty
prompt through all three encoders (the pipeline's default negative prompt). Objective: diffusers'
SD3 trainer (logit-normal timesteps by default, the scheduler's static shift, target `noise - x0`).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from loraflow.families.base import DTYPES, Cond, Family, with_pooled
from loraflow.families.flow_matching import add_flow_noise, draw_flow_noise, weighted_mse


class StableDiffusion3(Family):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    buckets_by_default = True
    denoiser_folder = "transformer"
    text_folders = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    lora_targets = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"]
    mlp_targets = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    objective_options = frozenset({"precondition_outputs"})
    default_max_length = 256  # T5 tokens (the pipeline's default)
    default_weighting = "logit_normal"

    def load_text_encoder(self, model_dir, settings, device):
        pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, transformer=None, vae=None, scheduler=None,
                                                        dtype=DTYPES[settings.dtype])
        return pipe.to(device)

    def encode(self, text_encoder, prompts, settings):
        prompts = [(settings.instruction or "") + p for p in prompts]
        with torch.no_grad():
            embeds, _, pooled, _ = text_encoder.encode_prompt(
                prompts, None, None, do_classifier_free_guidance=False,
                max_sequence_length=settings.max_length or self.default_max_length)
        return [{"prompt_embeds": e.cpu(), "pooled_prompt_embeds": p.cpu()} for e, p in zip(embeds, pooled)]

    def resolution_multiple(self, model_dir):
        # check_inputs: height % (vae_scale_factor * patch_size).
        patch = SD3Transformer2DModel.load_config(model_dir, subfolder="transformer")["patch_size"]
        return self.vae_scale_factor(model_dir) * patch

    def load_denoiser(self, model_dir, torch_dtype=torch.float32, **options):
        return SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=torch_dtype, **options)

    def load_noise_schedule(self, model_dir):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")

    def draw_noise(self, schedule, shape, generator, hp):
        return draw_flow_noise(shape, hp, self.default_weighting, generator)

    def training_loss(self, denoiser, schedule, batch, cond, draws, hp):
        latents = batch["latent"]
        noisy, timesteps, target, weighting, sigmas = add_flow_noise(schedule, latents, hp, self.default_weighting, draws)
        pred = denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        if hp.precondition_outputs is not False:  # diffusers' SD3 trainer's default
            # The clean latent the prediction implies, against the clean latent.
            pred, target = noisy - sigmas.view(-1, 1, 1, 1) * pred, latents
        return weighted_mse(pred, target, weighting)

    def pipeline(self, model_dir, denoiser, vae):
        return StableDiffusion3Pipeline(
            transformer=denoiser, vae=vae, scheduler=self.load_noise_schedule(model_dir),
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            text_encoder_3=None, tokenizer_3=None,
        )

    def generate(self, pipe, cond: Cond, null: Cond, settings, size, generator):
        return pipe(
            **with_pooled(cond, null),
            guidance_scale=settings.guidance_scale, num_inference_steps=settings.steps,
            height=size, width=size, generator=generator,
        ).images[0]
