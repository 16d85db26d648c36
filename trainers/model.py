"""The model being trained: a diffusers pipeline, its UNet frozen, and a trainable
(``trainers.trainables``: a LoRA adapter on the UNet, or a ControlNet beside it).

Both methods see the same small surface: encode prompts and images, noise latents, predict, the
prediction target, and ``reference()`` — the same UNet with the trainable switched off, which is the
frozen base model without a second copy in memory (HG-DPO's reference; LAN's reference).

Dtype policy (``trainers.precision``, applied in ``__init__`` and ``predict``): the UNet forward
under autocast in the compute dtype, the frozen UNet and text encoders stored in it, the VAE in
fp32, the trainable parameters in fp32 whatever the compute dtype.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from core.tiny_models import architecture_of

from .precision import Precision
from .config import LORA_TARGETS
from .trainables import LoraTrainable, Trainable


@dataclass
class Conditioning:
    """Text conditioning of a batch. ``pooled`` is SDXL's pooled text_encoder_2 embedding."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device) -> "Conditioning":
        return Conditioning(self.hidden.to(device), None if self.pooled is None else self.pooled.to(device))

    def repeat(self, n: int) -> "Conditioning":
        return Conditioning(
            self.hidden.repeat(n, 1, 1), None if self.pooled is None else self.pooled.repeat(n, 1)
        )


class TrainableModel:
    def __init__(
        self,
        pipe,
        *,
        rank: int = 8,
        alpha: float | None = None,
        target_modules=LORA_TARGETS,
        trainable: Trainable | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        gradient_checkpointing: bool = False,
        init_seed: int = 0,
    ):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.arch = architecture_of(pipe)
        self.device = torch.device(device)
        self.dtype = dtype  # the compute dtype
        self.precision = Precision(dtype, self.device)
        self.precision.check()
        # default: a LoRA (rank, alpha, target_modules); a ControlNet comes as ``trainable``
        self.trainable = trainable or LoraTrainable(rank, alpha, target_modules, init_seed)
        pipe.to(self.device)
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.unet = unet = pipe.unet
        unet.requires_grad_(False)
        self.precision.apply(pipe)
        self.trainable.attach(unet, dtype, gradient_checkpointing)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self._alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self._text_cache: dict[str, tuple] = {}

    # ---- parameters -----------------------------------------------------------------------
    def _frozen_modules(self):
        names = ("vae", "text_encoder", "text_encoder_2")
        return [getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None]

    def train(self, mode: bool = True) -> None:
        """Training or eval mode of what runs in a step: the UNet (dropout) and the trainable."""
        self.unet.train(mode)
        self.trainable.train(mode)

    @contextlib.contextmanager
    def reference(self):
        """The frozen base model: the same UNet with the trainable switched off."""
        with self.trainable.disabled():
            yield self

    # ---- encoding ---------------------------------------------------------------------------
    def conditioning(self, texts: list[str]) -> Conditioning:
        """Text conditioning of a batch; each distinct caption is encoded once per run (the text
        encoders are frozen, and captions repeat every epoch)."""
        cache = self._text_cache
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            encoded = self.encode_prompts(missing)
            for i, text in enumerate(missing):
                cache[text] = (encoded.hidden[i], None if encoded.pooled is None else encoded.pooled[i])
        hidden = torch.stack([cache[t][0] for t in texts])
        pooled = torch.stack([cache[t][1] for t in texts]) if self.arch == "sdxl" else None
        return Conditioning(hidden, pooled)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        if self.arch == "sdxl":
            hidden, _, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return Conditioning(hidden.to(self.dtype), pooled.to(self.dtype))
        hidden, _ = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(hidden.to(self.dtype))

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior of pixels in [-1, 1] (B,3,H,W) as (B,2,4,h,w): mean and std, fp32.
        Deterministic, so it can be cached; ``sample_latents`` draws from it."""
        dist = self.pipe.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        return torch.stack([dist.mean, dist.std], dim=1)

    def sample_latents(self, moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents drawn from posterior moments with the step's generator."""
        mean, std = moments[:, 0], moments[:, 1]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise) * self.pipe.vae.config.scaling_factor

    # ---- diffusion --------------------------------------------------------------------------
    def sample_noise_and_timesteps(self, latents: torch.Tensor, generator: torch.Generator):
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
        return noise, timesteps

    def add_noise(self, latents, noise, timesteps) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def added_conditions(self, cond: Conditioning, time_ids: torch.Tensor | None) -> dict | None:
        """SDXL's text_time conditioning: pooled text embedding and the six size/crop numbers
        (original h, w, crop top, left, target h, w) per sample."""
        if self.arch != "sdxl":
            return None
        return {"text_embeds": cond.pooled, "time_ids": time_ids.to(self.device, self.dtype)}

    def predict(self, noisy, timesteps, cond: Conditioning, time_ids: torch.Tensor | None = None,
                condition: torch.Tensor | None = None):
        """The UNet's output; ``condition`` (B,3,H,W in [0, 1]) is the ControlNet's image."""
        noisy, added = noisy.to(self.dtype), self.added_conditions(cond, time_ids)
        with self.precision.autocast():
            out = self.unet(
                noisy,
                timesteps,
                encoder_hidden_states=cond.hidden,
                added_cond_kwargs=added,
                return_dict=False,
                **self.trainable.unet_kwargs(noisy, timesteps, cond.hidden, added, condition),
            )[0]
        return out.float()

    def predicted_x0_and_eps(self, noisy, timesteps, pred):
        """(x0, eps) implied by a model output at the given timesteps."""
        a = self._alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
        if self.prediction_type == "epsilon":
            eps = pred
            x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
        else:  # v-prediction
            x0 = a.sqrt() * noisy - (1 - a).sqrt() * pred
            eps = (1 - a).sqrt() * noisy + a.sqrt() * pred
        return x0, eps
