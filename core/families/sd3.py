"""SD3 / SD3.5 (Medium: MMDiT-X with dual attention in its first blocks; Large): a rectified-flow
transformer on 16-channel latents that patchifies them itself (2×2 patches), conditioned on three
text encoders.

The objective is ``flow.py``'s, as diffusers' ``train_dreambooth_lora_sd3.py`` trains it: σ from
the logit-normal density (``training_utils.compute_density_for_timestep_sampling``), shifted as
``FlowMatchEulerDiscreteScheduler`` shifts SD3.5's sampling (fixed shift 3), and the transformer
given σ·1000, the timestep the pipeline's sampling loop passes. Conditioning is the pipeline's own
``encode_prompt``: CLIP-L and CLIP-G penultimate hidden states side by side, zero-padded to T5's
width, followed by T5's tokens; the pooled projection is CLIP-L's and CLIP-G's pooled embeddings
side by side.
"""
from __future__ import annotations

import torch

from .base import Conditioning
from .flow import FlowMatchingFamily
from .flux import FluxFamily

MAX_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length; a smaller tokenizer limit wins


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    lora_prefix = "lora_transformer_"  # ComfyUI's SD3 key map takes it (comfy/lora.py, "OneTrainer lora")
    renders_samples = True  # StableDiffusion3Pipeline: latents on the grid, scaling and shift undone
    diffusers_reads_kohya = False  # its SD3 loader takes peft keys under transformer., without alphas

    def __init__(self, pipe, device):
        super().__init__(pipe, device)
        self.max_sequence_length = min(MAX_T5_TOKENS, pipe.tokenizer_3.model_max_length)
        self.num_train_timesteps = self.schedule["num_train_timesteps"]

    @torch.no_grad()
    def encode_prompts(self, prompts, dtype):
        hidden, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(hidden.to(dtype), pooled.to(dtype))

    def predict(self, noisy, timesteps, cond, time_ids, trainable, condition):
        return self.denoiser(
            hidden_states=noisy,
            encoder_hidden_states=cond.hidden,
            pooled_projections=cond.pooled,
            timestep=timesteps.float() * self.num_train_timesteps,  # σ·1000, the t the pipeline passes
            return_dict=False,
        )[0]

    def guidance_kwargs(self, cfg=None, negative=None):
        """Classifier-free guidance as the pack's (SD3's own convention), the T5 sequence as long
        as in training (the pipeline's default, 256, would pad a shorter tokenizer's further)."""
        return {**super().guidance_kwargs(cfg, negative), "max_sequence_length": self.max_sequence_length}

    @classmethod
    def lora_targets(cls, names):
        """Flux's: joint attention, each image-stream projection with its text-stream twin (the
        image-only ``attn2`` of MMDiT-X blocks takes the plain names)."""
        return FluxFamily.lora_targets(names)

    def pipeline_prompt_kwargs(self, cond, negative):
        """The joint CLIP + T5 sequence and the pooled CLIP vectors, the empty negative prompt's beside
        them (SD3's classifier-free guidance encodes one)."""
        return {"prompt_embeds": cond.hidden, "pooled_prompt_embeds": cond.pooled,
                "negative_prompt_embeds": negative.hidden, "negative_pooled_prompt_embeds": negative.pooled}
