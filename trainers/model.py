"""The model being trained: a diffusers pipeline, its denoiser (a UNet, or a Flux transformer)
frozen, and a trainable (``trainers.trainables``: a LoRA adapter on the denoiser, or a ControlNet
beside a UNet).

Both methods see the same small surface: encode prompts and images, noise latents, predict, the
prediction target, and ``reference()`` — the same denoiser with the trainable switched off, which is
the frozen base model without a second copy in memory (HG-DPO's reference; LAN's reference). What
differs between model families (latent format, objective, timestep sampling, the denoiser call)
is the family's (``core.families``); this class adds the dtype policy, the trainable and caching.

Dtype policy (``trainers.precision``, applied in ``__init__`` and ``predict``): the denoiser forward
under autocast in the compute dtype, the frozen denoiser and text encoders stored in it (the
denoiser in fp8 with ``base_weights="fp8"``), the VAE in fp32, the trainable parameters in fp32
whatever the compute dtype.

Given ``texts`` (every text the run conditions on), the model encodes them in ``__init__``, into
``text_cache`` where there is one, and drops the text encoders from the pipeline before the
denoiser moves to the device (``--unload-text-encoders``).
"""
from __future__ import annotations

import contextlib
import gc

import torch

from core.families import Conditioning, family_of

from .cache import TensorCache
from .precision import Precision, base_weights_problem
from .config import LORA_TARGETS
from .trainables import LoraTrainable, Trainable

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


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
        base_weights: str = "compute",
        texts: list[str] | None = None,
        text_cache: TensorCache | None = None,
    ):
        self.pipe = pipe
        self.device = torch.device(device)
        self.family = family = family_of(pipe, self.device)
        self.arch = family.name
        self.dtype = dtype  # the compute dtype
        self.precision = Precision(dtype, self.device, base_weights)
        self.precision.check()
        # default: a LoRA (rank, alpha, target_modules); a ControlNet comes as ``trainable``
        self.trainable = trainable or LoraTrainable(rank, alpha, target_modules, init_seed)
        if self.trainable.kind == "controlnet" and family.denoiser_attribute != "unet":
            raise ValueError(f"a ControlNet is trained beside a UNet; {family.name} has a transformer")
        problem = base_weights_problem(base_weights, gradient_checkpointing, self.trainable.kind)
        if problem:
            raise ValueError(problem)
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.denoiser = denoiser = family.denoiser
        denoiser.requires_grad_(False)
        # Cast and store everything before it moves to the device, so the device never holds
        # the denoiser in a wider dtype than it trains with, nor it and the text encoders at once.
        self.precision.apply(pipe)
        self._text_rows: dict[str, tuple] = {}
        self.text_cache = text_cache
        self.text_encoders_released = False
        if texts is not None:
            self._encode_then_release(texts)
        self.trainable.attach(denoiser, dtype, gradient_checkpointing, targets_for=family.lora_targets)
        self.precision.store(denoiser)
        pipe.to(self.device)
        self.trainable.to(self.device)
        if gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under the UNet families' name (what HG-DPO and the ControlNet call it)."""
        return self.denoiser

    # ---- parameters -----------------------------------------------------------------------
    def _frozen_modules(self):
        names = ("vae", *TEXT_ENCODERS)
        return [getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None]

    def train(self, mode: bool = True) -> None:
        """Training or eval mode of what runs in a step: the denoiser (dropout) and the trainable."""
        self.denoiser.train(mode)
        self.trainable.train(mode)

    @contextlib.contextmanager
    def reference(self):
        """The frozen base model: the same denoiser with the trainable switched off."""
        with self.trainable.disabled():
            yield self

    # ---- encoding ---------------------------------------------------------------------------
    def conditioning(self, texts: list[str]) -> Conditioning:
        """Text conditioning of a batch; each distinct caption is encoded once per run (the text
        encoders are frozen, and captions repeat every epoch), and once for good where the model
        has a ``text_cache`` (a run directory's: a resumed run reads it). One caption at a time,
        so its embedding never depends on the captions it first shared a batch with (a resumed
        run meets them in other company)."""
        rows = self._text_rows
        for text in dict.fromkeys(texts):
            if text in rows:
                continue
            if self.text_cache is None:
                rows[text] = self._encode_one(text)
                continue
            stored = self.text_cache.get_or_compute(text, lambda text=text: dict(zip(("hidden", "pooled"),
                                                                                     self._encode_one(text))))
            pooled = stored.get("pooled")
            rows[text] = (stored["hidden"].to(self.device), None if pooled is None else pooled.to(self.device))
        return Conditioning.of_rows([rows[t] for t in texts])

    def _encode_one(self, text: str) -> tuple:
        """(hidden, pooled) of one text (pooled None where the family has none)."""
        if self.text_encoders_released:
            raise ValueError(f"the text {text!r} was not encoded before the text encoders were unloaded "
                             "(--unload-text-encoders): every text a run conditions on is encoded up front")
        return self.encode_prompts([text]).rows()[0]

    def _encode_then_release(self, texts: list[str]) -> None:
        """Encode every text of the run (the text encoders on the device only for this), then drop
        the text encoders from the pipeline: training reads the embeddings alone."""
        names = [n for n in TEXT_ENCODERS if getattr(self.pipe, n, None) is not None]
        for name in names:
            getattr(self.pipe, name).to(self.device)
        self.conditioning(list(texts))
        for name in names:
            getattr(self.pipe, name).to("cpu")  # off the device before the pipeline's reference goes
            setattr(self.pipe, name, None)
        self.text_encoders_released = True
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def prompt_embeddings(self, prompt: str) -> dict | None:
        """Once the text encoders are unloaded, the pipeline call's embedding arguments for
        ``prompt`` (and for the empty negative prompt), which were encoded up front; None while the
        pipeline encodes prompts itself."""
        if not self.text_encoders_released:
            return None
        return self.family.pipeline_prompt_kwargs(self.conditioning([prompt]), self.conditioning([""]))

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return self.family.encode_prompts(prompts, self.dtype)

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior of pixels in [-1, 1] (B,3,H,W) as (B,2,C,h,w): mean and std, fp32.
        Deterministic, so it can be cached; ``sample_latents`` draws from it."""
        dist = self.pipe.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        return torch.stack([dist.mean, dist.std], dim=1)

    def sample_latents(self, moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Normalized latents (the family's scaling and shift) drawn from posterior moments with
        the step's generator."""
        mean, std = moments[:, 0], moments[:, 1]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return self.family.normalize_latents(mean + std * noise)

    # ---- diffusion (the family's objective) ------------------------------------------------
    def sample_noise_and_timesteps(self, latents: torch.Tensor, generator: torch.Generator):
        return self.family.sample_noise_and_timesteps(latents, generator)

    def add_noise(self, latents, noise, timesteps) -> torch.Tensor:
        return self.family.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps) -> torch.Tensor:
        return self.family.target(latents, noise, timesteps)

    def loss_masks(self, latent_masks: torch.Tensor) -> torch.Tensor:
        return self.family.loss_masks(latent_masks)

    def added_conditions(self, cond: Conditioning, time_ids: torch.Tensor | None) -> dict | None:
        """SDXL's text_time conditioning of a UNet family (None for SD1.5)."""
        return self.family.added_conditions(cond, time_ids, self.dtype)

    def predict(self, noisy, timesteps, cond: Conditioning, time_ids: torch.Tensor | None = None,
                condition: torch.Tensor | None = None):
        """The denoiser's output on the latent grid; ``condition`` (B,3,H,W in [0, 1]) is the
        ControlNet's image."""
        noisy = noisy.to(self.dtype)
        with self.precision.autocast():
            out = self.family.predict(noisy, timesteps, cond, time_ids, self.trainable, condition)
        return out.float()

    def predicted_x0_and_eps(self, noisy, timesteps, pred):
        """(x0, eps) implied by a model output at the given timesteps."""
        return self.family.predicted_x0_and_eps(noisy, timesteps, pred)
