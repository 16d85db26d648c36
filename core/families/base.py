"""What the training code asks of a model family, and the text conditioning it gets back.

A family (``unet.py``: SD1.5 / SDXL; ``flux.py``: Flux.1) is bound to one loaded diffusers
pipeline and answers, for that pipeline: which module is the denoiser (it gets the LoRA), how
prompts become conditioning, how VAE samples become the latents it is trained on, how noise and
timesteps are drawn and mixed in, what its output should equal, and how the denoiser is called.
Everything that differs between families lives behind these methods, so the training loop and
the methods carry no ``if family`` branches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Text conditioning of a batch: ``hidden`` the per-token embedding the denoiser attends to,
    ``pooled`` one vector per prompt where the family has one (SDXL: text_encoder_2's; Flux:
    CLIP's), ``mask`` (B, L) True at real tokens where prompts have different token counts
    (Z-Image: ``hidden`` zero-padded to the longest); None: every token is real."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def to(self, device) -> "Conditioning":
        return Conditioning(*(None if t is None else t.to(device) for t in (self.hidden, self.pooled, self.mask)))

    def repeat(self, n: int) -> "Conditioning":
        return Conditioning(
            self.hidden.repeat(n, 1, 1), None if self.pooled is None else self.pooled.repeat(n, 1),
            None if self.mask is None else self.mask.repeat(n, 1),
        )

    def rows(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(hidden of the real tokens, pooled) per prompt."""
        return [(hidden if self.mask is None else hidden[self.mask[i]], None if self.pooled is None else self.pooled[i])
                for i, hidden in enumerate(self.hidden)]

    @classmethod
    def of_rows(cls, rows) -> "Conditioning":
        """The batch of ``rows()``-style rows, zero-padded with a mask where their lengths differ."""
        hiddens = [h for h, _ in rows]
        pooled = None if rows[0][1] is None else torch.stack([p for _, p in rows])
        lengths = [len(h) for h in hiddens]
        if len(set(lengths)) == 1:
            return cls(torch.stack(hiddens), pooled)
        hidden = torch.nn.utils.rnn.pad_sequence(hiddens, batch_first=True)
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None] < torch.tensor(lengths, device=hidden.device)[:, None]
        return cls(hidden, pooled, mask)


class ModelFamily:
    """One family's training interface. ``name`` is the architecture written into LoRA metadata
    and file names; ``lora_prefix`` the kohya key prefix ComfyUI maps for this family."""

    name: str = ""
    denoiser_attribute: str = ""  # the pipeline attribute of the denoiser: "unet" or "transformer"
    lora_prefix: str = "lora_unet_"
    pixel_multiple: int = 8  # image sides the denoiser takes: multiples of the VAE's 8 (Flux: 16)
    renders_samples: bool = True  # render() works: sample, build-pairs, --sample-every, validation
    # diffusers' loader of this family reads the pack's kohya files (core.lora_format.load_into_pipeline)
    diffusers_reads_kohya: bool = True

    def __init__(self, pipe, device: torch.device):
        self.pipe, self.device = pipe, device

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attribute)

    # ---- conditioning and latents -----------------------------------------------------------
    def encode_prompts(self, prompts: list[str], dtype: torch.dtype) -> Conditioning:
        raise NotImplementedError

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE samples as the denoiser sees them (the VAE config's scaling and shift factors)."""
        raise NotImplementedError

    # ---- the training objective -------------------------------------------------------------
    def sample_noise_and_timesteps(self, latents: torch.Tensor, generator: torch.Generator):
        raise NotImplementedError

    def add_noise(self, latents, noise, timesteps) -> torch.Tensor:
        raise NotImplementedError

    def target(self, latents, noise, timesteps) -> torch.Tensor:
        raise NotImplementedError

    def predicted_x0_and_eps(self, noisy, timesteps, pred):
        """(x0, eps) implied by a denoiser output at the given timesteps."""
        raise NotImplementedError

    def loss_masks(self, latent_masks: torch.Tensor) -> torch.Tensor:
        """Region masks (B, R, h, w) on the latent grid as the masked losses weigh them: each
        denoiser input unit (a latent cell, or a transformer token) takes the largest value it
        covers, so a region smaller than a unit still owns that unit."""
        return latent_masks

    # ---- the denoiser call ------------------------------------------------------------------
    def added_conditions(self, cond: Conditioning, time_ids, dtype) -> dict | None:
        """A UNet's ``added_cond_kwargs`` (SDXL's text_time); None where the family has none."""
        return None

    def predict(self, noisy, timesteps, cond: Conditioning, time_ids, trainable, condition) -> torch.Tensor:
        """The denoiser's output on the latent grid (B, C, h, w) for ``noisy`` in the compute
        dtype, called under the caller's autocast. ``time_ids``: SDXL's size/crop numbers;
        ``trainable`` and ``condition``: a ControlNet's extra inputs (UNet families only)."""
        raise NotImplementedError

    @classmethod
    def lora_targets(cls, names: list[str]) -> list[str]:
        """The denoiser modules that get LoRA for the requested ``--target-modules`` names (the
        architecture's alone: no loaded pipeline needed)."""
        return list(names)

    # ---- statistic matching and fixed probes (HG-DPO) -----------------------------------------
    def stat_latent(self, noisy, timesteps, pred) -> torch.Tensor:
        """The one-step sample from ``noisy`` implied by ``pred``, on the (B, C, h, w) latent grid:
        the latent whose channel means HG-DPO's statistic-matching loss compares."""
        raise NotImplementedError

    def probe_timesteps(self, n: int) -> torch.Tensor:
        """``n`` timesteps spread evenly over the training schedule (fixed-probe measurements)."""
        raise NotImplementedError

    # ---- rendering (the family's own pipeline) -------------------------------------------------
    def guidance_kwargs(self, cfg: float | None = None, negative: str | None = None) -> dict:
        """The pipeline call's guidance arguments for the pack's classifier-free guidance scale
        ``cfg`` (None: the pipeline's default) and negative prompt."""
        out = {} if cfg is None else {"guidance_scale": cfg}
        return {**out, "negative_prompt": negative or None}

    def pipeline_latents_to_grid(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's sampling latents (what ``callback_on_step_end`` and ``output_type='latent'``
        give) on the (B, C, h, w) latent grid of an image of ``height`` × ``width`` pixels (None:
        the pipeline's default)."""
        return latents

    def grid_to_pipeline_latents(self, grid: torch.Tensor) -> torch.Tensor:
        """The inverse of ``pipeline_latents_to_grid``."""
        return grid

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of ``normalize_latents``: grid latents as the VAE decodes them."""
        raise NotImplementedError

    def require_rendering(self) -> None:
        """Refuse, before any work, a family whose pipeline call is not tested yet."""
        if not self.renders_samples:
            raise ValueError(f"the pack cannot render {self.name} images yet (docs/families.md)")

    def render(self, prompts, generator, *, cfg: float | None = None, negative: str | None = None,
               autocast=None, height: int | None = None, width: int | None = None, **kwargs) -> list:
        """PIL images of ``prompts`` from the family's pipeline; ``kwargs`` go to the pipeline call
        (num_inference_steps, callback_on_step_end, ...). ``autocast``: a context to run the
        denoising loop under; the VAE then decodes in fp32 outside it (the pipelines decode
        half-precision latents with the fp32 VAE only on Apple's MPS)."""
        self.require_rendering()
        kwargs = {**self.guidance_kwargs(cfg, negative), **kwargs}
        if height or width:
            kwargs.update(height=height, width=width)
        if autocast is None:
            return self.pipe(prompts, generator=generator, **kwargs).images
        with autocast:
            latents = self.pipe(prompts, generator=generator, output_type="latent", **kwargs).images
        return self.decode(latents, height, width)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int | None, width: int | None) -> list:
        """PIL images of the pipeline's ``output_type='latent'`` result for an image of ``height``
        × ``width`` pixels (None: the pipeline's default), the VAE in fp32."""
        vae = self.pipe.vae
        grid = self.pipeline_latents_to_grid(latents, height, width).to(vae.dtype)
        image = vae.decode(self.denormalize_latents(grid), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")

    def pipeline_prompt_kwargs(self, cond: Conditioning, negative: Conditioning) -> dict:
        """The pipeline call's arguments that render ``cond`` (``encode_prompts``' output) instead of
        a prompt, ``negative`` being the empty negative prompt's, where the pipeline's guidance
        encodes one: what rendering takes once the text encoders are unloaded."""
        raise ValueError(f"the pack cannot render {self.name} images from prompt embeddings yet: "
                         "set --sample-every and --validate-every to 0, or --unload-text-encoders false")


def denoiser_architecture(denoiser) -> str | None:
    """'sd15', 'sdxl', 'flux' or 'zimage' of a denoiser module from its config; None without one."""
    config = getattr(denoiser, "config", None)
    if config is None:
        return None
    if "guidance_embeds" in config:
        return "flux"
    if "all_f_patch_size" in config:  # Z-Image's per-patch-size embedders
        return "zimage"
    if "dual_attention_layers" in config:  # SD3Transformer2DModel, 3.0 and 3.5 alike
        return "sd3"
    return "sdxl" if getattr(config, "addition_embed_type", None) == "text_time" else "sd15"
