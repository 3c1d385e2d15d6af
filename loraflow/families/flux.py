"""Flux: MMDiT with single-stream blocks, CLIP (pooled only) plus T5, packed latents, flow matching.

Text: CLIP's pooled output and T5's hidden states, as `FluxPipeline.encode_prompt` computes them;
`max_length` is the T5 length. `encoder.t5_attention_mask` also feeds T5 the padding mask (the
pipeline does not), which changes every embedding. Null embedding: the empty prompt, used for true
classifier-free guidance (`negative_prompt_embeds` + `true_cfg_scale`). Objective: diffusers' Flux
trainer (latents packed 2x2 into tokens, uniform timesteps by default, timestep / 1000, target
`noise - x0`, the guidance embedding fed `train.guidance_embedding` when the transformer has one).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from loraflow.families.base import DTYPES, Cond, Family, with_pooled
from loraflow.families.flow_matching import add_flow_noise, draw_flow_noise, weighted_mse


class Flux(Family):
    name = "flux"
    pipeline_class = FluxPipeline
    buckets_by_default = True
    denoiser_folder = "transformer"
    text_folders = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    lora_targets = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    mlp_targets = ["proj_mlp"]  # the single-stream blocks' MLP (the dual-stream ones' are in lora_targets)
    default_max_length = 512  # T5 tokens (FLUX.1-dev; schnell uses 256)
    default_weighting = "none"

    def load_text_encoder(self, model_dir, settings, device):
        pipe = FluxPipeline.from_pretrained(model_dir, transformer=None, vae=None, scheduler=None,
                                            dtype=DTYPES[settings.dtype])
        return pipe.to(device)

    def encode(self, text_encoder, prompts, settings):
        pipe = text_encoder
        prompts = [(settings.instruction or "") + p for p in prompts]
        clip = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length,
                              truncation=True, return_tensors="pt")
        t5 = pipe.tokenizer_2(prompts, padding="max_length", max_length=settings.max_length or self.default_max_length,
                              truncation=True, return_tensors="pt")
        mask = t5.attention_mask.to(pipe.text_encoder_2.device) if settings.t5_attention_mask else None
        with torch.no_grad():
            pooled = pipe.text_encoder(clip.input_ids.to(pipe.text_encoder.device)).pooler_output
            embeds = pipe.text_encoder_2(t5.input_ids.to(pipe.text_encoder_2.device), attention_mask=mask)[0]
        return [{"prompt_embeds": e.cpu(), "pooled_prompt_embeds": p.cpu()} for e, p in zip(embeds, pooled)]

    def resolution_multiple(self, model_dir):
        # Latents are packed 2x2 into tokens; the pipeline would silently resize anything else.
        return self.vae_scale_factor(model_dir) * 2

    def load_denoiser(self, model_dir, torch_dtype=torch.float32, **options):
        return FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=torch_dtype, **options)

    def load_noise_schedule(self, model_dir):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")

    def draw_noise(self, schedule, shape, generator, hp):
        return draw_flow_noise(shape, hp, self.default_weighting, generator)

    def training_loss(self, denoiser, schedule, batch, cond, draws, hp):
        latents = batch["latent"]
        b, c, h, w = latents.shape
        noisy, timesteps, target, weighting, _ = add_flow_noise(schedule, latents, hp, self.default_weighting, draws)
        embeds = cond["prompt_embeds"]
        guidance = None
        if getattr(denoiser, "module", denoiser).config.guidance_embeds:  # the model itself, or under DDP
            guidance = torch.full((b,), hp.guidance_embedding, device=latents.device)
        pred = denoiser(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=timesteps / 1000,
            guidance=guidance, pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype),
            return_dict=False,
        )[0]
        # Packing only reorders values, so the loss is taken on packed tokens.
        return weighted_mse(pred, FluxPipeline._pack_latents(target, b, c, h, w), weighting)

    def pipeline(self, model_dir, denoiser, vae):
        return FluxPipeline(transformer=denoiser, vae=vae, scheduler=self.load_noise_schedule(model_dir),
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)

    def generate(self, pipe, cond: Cond, null: Cond, settings, size, generator):
        return pipe(
            **with_pooled(cond, null),
            true_cfg_scale=settings.guidance_scale, guidance_scale=settings.guidance_embedding,
            num_inference_steps=settings.steps, height=size, width=size, generator=generator,
        ).images[0]
