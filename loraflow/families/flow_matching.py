"""The rectified-flow objective of diffusers' SD3 and Flux trainers, shared by those two families.

Timesteps are drawn from the density of `hp.weighting_scheme` (logit-normal, mode, uniform), mapped
to the scheduler's own sigmas (so a static shift in the model's scheduler config applies), and the
squared error is weighted per sample; all through `diffusers.training_utils`.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from loraflow.config import TrainConfig


def draw_flow_noise(shape: torch.Size, hp: TrainConfig, default_scheme: str,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Noise and a point `u` in 0..1 per latent drawn from the weighting scheme's density, from the
    CPU generator (its state is checkpointed)."""
    noise = torch.randn(shape, generator=generator)
    u = compute_density_for_timestep_sampling(hp.weighting_scheme or default_scheme, shape[0], logit_mean=hp.logit_mean,
                                              logit_std=hp.logit_std, mode_scale=hp.mode_scale, generator=generator)
    return {"noise": noise, "u": u}


def add_flow_noise(scheduler, latents: torch.Tensor, hp: TrainConfig, default_scheme: str,
                   draws: dict[str, torch.Tensor]):
    """(noisy latents, timesteps 0..1000, target `noise - x0`, loss weight per sample, sigmas)."""
    scheme = hp.weighting_scheme or default_scheme
    noise, u = draws["noise"], draws["u"].cpu()
    index = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[index].to(latents.device)
    sigmas = scheduler.sigmas[index].to(latents.device, latents.dtype)
    s = sigmas.view(-1, *[1] * (latents.ndim - 1))
    noisy = (1.0 - s) * latents + s * noise
    return noisy, timesteps, noise - latents, compute_loss_weighting_for_sd3(scheme, sigmas), sigmas


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor) -> torch.Tensor:
    w = weighting.float().view(-1, *[1] * (pred.ndim - 1))
    return (w * (pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(1).mean()
