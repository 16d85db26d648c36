"""Flux.1 (dev and schnell): a rectified-flow transformer (``flow.py``: latents, σ, noising,
token-grid masks) on 16-channel latents, packed into 2×2-patch tokens.

The transformer predicts the velocity noise − x0, the target of diffusers'
``train_dreambooth_lora_flux.py``; σ is shifted by image size for dev (``use_dynamic_shifting``),
by the fixed shift for schnell (1, none). Flux.1-dev's guidance-distilled transformer also takes
a guidance scale.
"""
from __future__ import annotations

import torch

from .base import Conditioning
from .flow import PATCH, FlowMatchingFamily

# The guidance scale the dev transformer is trained with (diffusers' and kohya's Flux LoRA default).
TRAIN_GUIDANCE = 3.5
MAX_T5_TOKENS = 512  # Flux.1-dev's T5 sequence length; a smaller tokenizer limit wins
# Joint attention: each image-stream projection has a text-stream twin; a LoRA on one covers both.
TEXT_STREAM_TWINS = {"to_q": "add_q_proj", "to_k": "add_k_proj", "to_v": "add_v_proj", "to_out.0": "to_add_out"}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 · w/2, 4C): one token per 2×2 patch, row-major."""
    b, c, h, w = latents.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"Flux packs 2×2 latent patches: the latent grid {h}×{w} must have even sides "
                         "(image sides multiples of 16)")
    x = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack`` for a latent grid of h×w cells."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.view(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux's RoPE positions of the image tokens: (unused axis, row, column) per token."""
    rows = torch.arange(h // PATCH, device=device, dtype=dtype)[:, None].expand(h // PATCH, w // PATCH)
    cols = torch.arange(w // PATCH, device=device, dtype=dtype)[None, :].expand(h // PATCH, w // PATCH)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    lora_prefix = "lora_transformer_"  # the kohya-style Flux prefix ComfyUI and diffusers both map
    renders_samples = True  # FluxPipeline: packed latents unpacked, scaling and shift undone

    def __init__(self, pipe, device):
        super().__init__(pipe, device)
        self.max_sequence_length = min(MAX_T5_TOKENS, pipe.tokenizer_2.model_max_length)

    @torch.no_grad()
    def encode_prompts(self, prompts, dtype):
        hidden, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(hidden.to(dtype), pooled.to(dtype))

    def predict(self, noisy, timesteps, cond, time_ids, trainable, condition):
        transformer = self.denoiser
        b, _, h, w = noisy.shape
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), TRAIN_GUIDANCE, device=noisy.device, dtype=noisy.dtype)
        tokens = transformer(
            hidden_states=pack(noisy),
            timestep=timesteps.to(noisy.dtype),  # σ in [0, 1]; the transformer scales it by 1000
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.hidden,
            txt_ids=torch.zeros(cond.hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=image_ids(h, w, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        return unpack(tokens, h, w)

    def guidance_kwargs(self, cfg=None, negative=None):
        """Flux.1-dev is guidance-distilled: its transformer takes the guidance scale it was trained
        with (3.5) as an input, and ``cfg`` is classifier-free guidance proper (FluxPipeline's
        ``true_cfg_scale``), which runs only against a negative prompt. The T5 sequence is as long
        as in training."""
        out = {"guidance_scale": TRAIN_GUIDANCE, "max_sequence_length": self.max_sequence_length}
        if negative:
            out.update(negative_prompt=negative, true_cfg_scale=1.0 if cfg is None else cfg)
        return out

    def pipeline_latents_to_grid(self, latents, height, width):
        scale = self.pipe.vae_scale_factor * PATCH  # pixels per token side
        height = height or self.pipe.default_sample_size * self.pipe.vae_scale_factor
        width = width or self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return unpack(latents, PATCH * (height // scale), PATCH * (width // scale))

    def grid_to_pipeline_latents(self, grid):
        return pack(grid)

    @classmethod
    def lora_targets(cls, names):
        out = list(names)
        out += [TEXT_STREAM_TWINS[n] for n in names if n in TEXT_STREAM_TWINS and TEXT_STREAM_TWINS[n] not in out]
        return out

    def pipeline_prompt_kwargs(self, cond, negative):
        """T5's token embedding and CLIP's pooled vector; no negative (``true_cfg_scale`` runs only
        against a negative prompt, which the training renders do not give)."""
        return {"prompt_embeds": cond.hidden, "pooled_prompt_embeds": cond.pooled}
