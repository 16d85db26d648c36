"""What the rectified-flow transformer families (Flux.1, Z-Image) share: the latent format of
their 16-channel VAE, σ drawn as the reference trainers draw it, the straight noising path, and
region masks pooled to the 2×2-patch token grid.

x_t = (1 − σ)·x0 + σ·noise. σ is drawn as kohya's sd-scripts ``--timestep_sampling flux_shift``
draws it: logit-normal (sigmoid of a standard normal), then shifted toward noise as the
scheduler shifts its sampling schedule — by a resolution-dependent shift where the scheduler
config says ``use_dynamic_shifting``, by its fixed ``shift`` otherwise. The families differ in the
sign of the velocity their transformer predicts (``VELOCITY_SIGN``) and in how it is called.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import ModelFamily

PATCH = 2  # a transformer token is a 2×2 patch of latent cells


class FlowMatchingFamily(ModelFamily):
    denoiser_attribute = "transformer"
    renders_samples = False  # patch tokens and the shift factor: not in Precision.generate yet
    # +1: the transformer predicts noise − x0 (Flux); −1: x0 − noise (Z-Image).
    VELOCITY_SIGN = 1

    def __init__(self, pipe, device):
        super().__init__(pipe, device)
        self.schedule = pipe.scheduler.config

    def normalize_latents(self, latents):
        config = self.pipe.vae.config
        return (latents - config.shift_factor) * config.scaling_factor

    def shift(self, sigmas: torch.Tensor, tokens: int) -> torch.Tensor:
        """σ moved toward noise as the scheduler moves the sampling schedule: exp(μ) with μ
        linear in the image's token count (dynamic shifting), or the config's fixed shift."""
        cfg = self.schedule
        if cfg.get("use_dynamic_shifting"):
            slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
            shift = math.exp(cfg["base_shift"] + slope * (tokens - cfg["base_image_seq_len"]))
        else:
            shift = float(cfg.get("shift", 1.0))
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def sample_noise_and_timesteps(self, latents, generator):
        """(noise, σ per sample in [0, 1])."""
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        logit_normal = torch.sigmoid(torch.randn(latents.shape[0], generator=generator))
        tokens = (latents.shape[-2] // PATCH) * (latents.shape[-1] // PATCH)
        return noise, self.shift(logit_normal, tokens).to(latents.device)

    @staticmethod
    def _sigma(timesteps, like):
        return timesteps.to(like).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, latents, noise, timesteps):
        sigma = self._sigma(timesteps, latents)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents, noise, timesteps):
        return self.VELOCITY_SIGN * (noise - latents)

    def predicted_x0_and_eps(self, noisy, timesteps, pred):
        sigma = self._sigma(timesteps, pred).float()
        velocity = self.VELOCITY_SIGN * pred  # noise − x0
        return noisy - sigma * velocity, noisy + (1 - sigma) * velocity

    def loss_masks(self, latent_masks):
        tokens = F.max_pool2d(latent_masks, PATCH)
        return tokens.repeat_interleave(PATCH, dim=-2).repeat_interleave(PATCH, dim=-1)
