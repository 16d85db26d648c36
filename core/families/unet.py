"""SD1.5 and SDXL: a UNet trained with the DDPM objective (epsilon or v-prediction, as the
scheduler config says), timesteps drawn uniformly from the 1000 training steps; SDXL adds its
``text_time`` conditioning (pooled text embedding and the six size/crop numbers)."""
from __future__ import annotations

import torch

from ..dpo import ddpm_posterior_mean
from .base import Conditioning, ModelFamily, denoiser_architecture


class UNetFamily(ModelFamily):
    denoiser_attribute = "unet"
    lora_prefix = "lora_unet_"

    def __init__(self, pipe, device):
        from diffusers import DDPMScheduler

        super().__init__(pipe, device)
        self.name = denoiser_architecture(pipe.unet)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self._alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)

    @torch.no_grad()
    def encode_prompts(self, prompts, dtype):
        if self.name == "sdxl":
            hidden, _, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return Conditioning(hidden.to(dtype), pooled.to(dtype))
        hidden, _ = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(hidden.to(dtype))

    def normalize_latents(self, latents):
        return latents * self.pipe.vae.config.scaling_factor

    def denormalize_latents(self, latents):
        return latents / self.pipe.vae.config.scaling_factor

    def sample_noise_and_timesteps(self, latents, generator):
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
        return noise, timesteps

    def add_noise(self, latents, noise, timesteps):
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def predicted_x0_and_eps(self, noisy, timesteps, pred):
        a = self._alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
        if self.prediction_type == "epsilon":
            eps = pred
            x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
        else:  # v-prediction
            x0 = a.sqrt() * noisy - (1 - a).sqrt() * pred
            eps = (1 - a).sqrt() * noisy + a.sqrt() * pred
        return x0, eps

    def stat_latent(self, noisy, timesteps, pred):
        """One DDPM step to t − 1 without its noise (the posterior mean): the step's noise is
        shared by the tuned and the reference model, so it cancels from their difference."""
        x0, _ = self.predicted_x0_and_eps(noisy, timesteps, pred)
        return ddpm_posterior_mean(noisy, x0, timesteps, self._alphas_cumprod)

    def probe_timesteps(self, n):
        steps = self.noise_scheduler.config.num_train_timesteps
        return ((torch.arange(n) + 0.5) * steps / n).long().to(self.device)

    def added_conditions(self, cond: Conditioning, time_ids: torch.Tensor | None, dtype) -> dict | None:
        """SDXL's text_time conditioning: pooled text embedding and the six size/crop numbers
        (original h, w, crop top, left, target h, w) per sample."""
        if self.name != "sdxl":
            return None
        return {"text_embeds": cond.pooled, "time_ids": time_ids.to(self.device, dtype)}

    def predict(self, noisy, timesteps, cond, time_ids, trainable, condition):
        added = self.added_conditions(cond, time_ids, noisy.dtype)
        return self.denoiser(
            noisy,
            timesteps,
            encoder_hidden_states=cond.hidden,
            added_cond_kwargs=added,
            return_dict=False,
            **trainable.unet_kwargs(noisy, timesteps, cond.hidden, added, condition),
        )[0]

    def pipeline_prompt_kwargs(self, cond, negative):
        """SD1.5 encodes the empty negative prompt; SDXL too, unless its pipeline zeroes it
        (``force_zeros_for_empty_prompt``): then no negative is passed and the pipeline zeroes it."""
        out = {"prompt_embeds": cond.hidden}
        if self.name != "sdxl":
            return {**out, "negative_prompt_embeds": negative.hidden}
        out["pooled_prompt_embeds"] = cond.pooled
        if not self.pipe.config.get("force_zeros_for_empty_prompt", True):
            out.update(negative_prompt_embeds=negative.hidden, negative_pooled_prompt_embeds=negative.pooled)
        return out
