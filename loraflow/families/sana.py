"""Sana: linear-attention transformer, Gemma-2 text encoder with attention mask, DC-AE, flow matching.

Null embedding: the empty prompt, right-padded to the max length, encoded *without* the
instruction prefix and kept with its mask (the diffusers pipeline's negative prompt and native
Sana's `null_embed_*.pth`). The training objective follows native Sana: flow matching with the
scheduler's shift applied to uniformly drawn sigmas, target `noise - x0`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
from transformers import AutoModel, AutoTokenizer

from loraflow.families.base import DTYPES, Cond, Family, on_weights


class Sana(Family):
    name = "sana"
    pipeline_class = SanaPipeline
    denoiser_folder = "transformer"
    text_folders = ("text_encoder", "tokenizer")
    lora_targets = ["to_k", "to_q", "to_v"]
    mlp_targets = ["ff.conv_inverted", "ff.conv_point"]  # the GLU MBConv feed-forward's 1x1 convolutions
    default_max_length = 300

    def load_text_encoder(self, model_dir, settings, device):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        tokenizer.padding_side = "right"  # Sana's encode_prompt forces right padding
        encoder = AutoModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=DTYPES[settings.dtype])
        return tokenizer, encoder.to(device).eval()

    def encode(self, text_encoder, prompts, settings):
        tokenizer, encoder = text_encoder
        n = settings.max_length or self.default_max_length
        if settings.instruction:
            # As SanaPipeline with a complex human instruction: encode instruction + prompt, then keep
            # BOS and the last n-1 positions.
            prompts = [settings.instruction + p for p in prompts]
            length = len(tokenizer.encode(settings.instruction)) + n - 2
            keep = [0] + list(range(-n + 1, 0))
        else:
            length, keep = n, list(range(n))
        tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        with torch.no_grad():
            embeds = encoder(tokens.input_ids.to(encoder.device), attention_mask=tokens.attention_mask.to(encoder.device))[0]
        return [{"prompt_embeds": e[keep].cpu(), "prompt_attention_mask": m[keep]}
                for e, m in zip(embeds, tokens.attention_mask)]

    def null_embedding(self, text_encoder, settings):
        return self.encode(text_encoder, [""], settings.model_copy(update={"instruction": None}))[0]

    def load_vae(self, model_dir, device):
        return AutoencoderDC.from_pretrained(model_dir, subfolder="vae").to(device).eval()

    def vae_scale_factor(self, model_dir):
        # A DC-AE (32x in real checkpoints): its encoder's blocks, as SanaPipeline counts them.
        return 2 ** (len(AutoencoderDC.load_config(model_dir, subfolder="vae")["encoder_block_out_channels"]) - 1)

    def resolution_multiple(self, model_dir):
        # check_inputs wants height % 32, whatever the VAE.
        return math.lcm(32, self.vae_scale_factor(model_dir))

    def encode_images(self, vae, pixels):
        with torch.no_grad():
            return vae.encode(on_weights(pixels, vae)).latent.cpu() * vae.config.scaling_factor

    def load_denoiser(self, model_dir, torch_dtype=torch.float32, **options):
        return SanaTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=torch_dtype, **options)

    def load_noise_schedule(self, model_dir):
        config = FlowMatchEulerDiscreteScheduler.load_config(model_dir, subfolder="scheduler")
        # Converted Sana checkpoints ship a DPM-Solver config with `flow_shift`; tiny ones `shift`.
        return {"shift": float(config.get("flow_shift") or config.get("shift") or 1.0)}

    def draw_noise(self, schedule, shape, generator, hp):
        # From the CPU generator (its state is checkpointed): noise, and a point in 0..1 per latent.
        return {"noise": torch.randn(shape, generator=generator), "u": torch.rand((shape[0],), generator=generator)}

    def training_loss(self, denoiser, schedule, batch, cond, draws, hp):
        latents = batch["latent"]
        noise, u = draws["noise"], draws["u"]
        shift = schedule["shift"]
        sigma = shift * u / (1 + (shift - 1) * u)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        pred = denoiser(hidden_states=noisy, encoder_hidden_states=cond["prompt_embeds"],
                        encoder_attention_mask=cond["prompt_attention_mask"], timestep=sigma * 1000).sample
        return F.mse_loss(pred.float(), (noise - latents).float())

    def pipeline(self, model_dir, denoiser, vae):
        shift = self.load_noise_schedule(model_dir)["shift"]
        return SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=denoiser,
                            scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))

    def generate(self, pipe, cond: Cond, null: Cond, settings, size, generator):
        return pipe(
            prompt_embeds=cond["prompt_embeds"][None], prompt_attention_mask=cond["prompt_attention_mask"][None],
            negative_prompt=None, negative_prompt_embeds=null["prompt_embeds"][None],
            negative_prompt_attention_mask=null["prompt_attention_mask"][None],
            guidance_scale=settings.guidance_scale, num_inference_steps=settings.steps,
            height=size, width=size, generator=generator, use_resolution_binning=False,
        ).images[0]
