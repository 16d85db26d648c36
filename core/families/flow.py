"""What the rectified-flow transformers (Flux.1, SD3.5) share: latents (VAE sample − shift factor)
× scaling factor, σ drawn logit-normal and shifted as the scheduler shifts sampling, x_t = (1 − σ)·x0
+ σ·noise with the target velocity noise − x0 (diffusers' ``train_dreambooth_lora_flux.py`` and
``train_dreambooth_lora_sd3.py``), region masks max-pooled to the transformer's 2×2 patches, and
LoRA on the joint attention's image-stream projections and their text-stream twins.

A subclass says how prompts are encoded and how its transformer is called. ``timesteps`` stay σ in
[0, 1] everywhere; each family converts to what its transformer takes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import ModelFamily

PATCH = 2  # a transformer token is a 2×2 patch of latent cells
# Joint attention: each image-stream projection has a text-stream twin; a LoRA on one covers both.
TEXT_STREAM_TWINS = {"to_q": "add_q_proj", "to_k": "add_k_proj", "to_v": "add_v_proj", "to_out.0": "to_add_out"}


class FlowMatchingFamily(ModelFamily):
    denoiser_attribute = "transformer"
    lora_prefix = "lora_transformer_"  # the kohya-style DiT prefix ComfyUI and diffusers map
    renders_samples = False  # the shift factor (and Flux's packing): not in Precision.generate yet

    def __init__(self, pipe, device):
        super().__init__(pipe, device)
        self.schedule = pipe.scheduler.config

    def normalize_latents(self, latents):
        config = self.pipe.vae.config
        return (latents - config.shift_factor) * config.scaling_factor

    def shift(self, sigmas: torch.Tensor, tokens: int) -> torch.Tensor:
        """σ moved toward noise as the scheduler moves the sampling schedule: exp(μ) with μ
        linear in the image's token count (dynamic shifting, Flux.1-dev), or the config's fixed
        shift (SD3.5: 3; Flux.1-schnell: 1, none)."""
        cfg = self.schedule
        if cfg.get("use_dynamic_shifting"):
            slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
            shift = math.exp(cfg["base_shift"] + slope * (tokens - cfg["base_image_seq_len"]))
        else:
            shift = float(cfg.get("shift", 1.0))
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def sample_noise_and_timesteps(self, latents, generator):
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
        return noise - latents

    def predicted_x0_and_eps(self, noisy, timesteps, pred):
        sigma = self._sigma(timesteps, pred).float()
        return noisy - sigma * pred, noisy + (1 - sigma) * pred

    def loss_masks(self, latent_masks):
        tokens = F.max_pool2d(latent_masks, PATCH)
        return tokens.repeat_interleave(PATCH, dim=-2).repeat_interleave(PATCH, dim=-1)

    def lora_targets(self, names):
        out = list(names)
        out += [TEXT_STREAM_TWINS[n] for n in names if n in TEXT_STREAM_TWINS and TEXT_STREAM_TWINS[n] not in out]
        return out
