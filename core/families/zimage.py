"""Z-Image (Turbo and base): a single-stream rectified-flow transformer (``flow.py``: latents,
σ, noising, token-grid masks) on Flux's 16-channel latent format, conditioned on a Qwen3 text
encoder.

What sets it apart, as diffusers' ``ZImagePipeline`` runs it:
- prompts go through Qwen's chat template, and the conditioning is the text encoder's
  second-to-last hidden states of the real tokens only: a different length per prompt
  (``Conditioning.mask`` marks them in a padded batch; the transformer takes a list);
- the transformer is told the time as 1 − σ (1 at the clean image; the pipeline passes
  (1000 − t) / 1000), and it predicts x0 − noise, the negated Flux velocity (the pipeline
  negates its output before the Euler step);
- it patchifies the 2×2 patches itself, from latents given as a list of (C, 1, h, w) frames.
"""
from __future__ import annotations

import torch

from .base import Conditioning
from .flow import FlowMatchingFamily

MAX_QWEN_TOKENS = 512  # ZImagePipeline's max_sequence_length; a smaller tokenizer limit wins


class ZImageFamily(FlowMatchingFamily):
    name = "zimage"
    # ComfyUI 0.33 maps Z-Image LoRA keys by the diffusers module path, bare or under
    # "diffusion_model.", "transformer." or "lycoris_" (comfy/lora.py, its Lumina2 branch), and
    # neither lora_unet_ nor lora_transformer_. Of those, diffusers 0.42's Z-Image loader reads
    # kohya-style down/up/alpha keys only under "diffusion_model." (or bare): under "transformer."
    # it prefixes them a second time.
    lora_prefix = "diffusion_model."
    VELOCITY_SIGN = -1  # the transformer predicts x0 − noise
    renders_samples = True  # ZImagePipeline: latents on the grid, scaling and shift undone

    def __init__(self, pipe, device):
        super().__init__(pipe, device)
        self.max_sequence_length = min(MAX_QWEN_TOKENS, pipe.tokenizer.model_max_length)

    @torch.no_grad()
    def encode_prompts(self, prompts, dtype):
        hidden, _ = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning.of_rows([(h.to(dtype), None) for h in hidden])

    def guidance_kwargs(self, cfg=None, negative=None):
        """ZImagePipeline's ``guidance_scale`` w guides as pos + w·(pos − neg), so the pack's
        classifier-free scale (neg + cfg·(pos − neg)) is w = cfg − 1: cfg 1 (w 0) samples without
        guidance, as Z-Image-Turbo does. The Qwen sequence is as long as in training."""
        out = {"max_sequence_length": self.max_sequence_length, "negative_prompt": negative or None}
        return out if cfg is None else {**out, "guidance_scale": max(cfg - 1.0, 0.0)}

    def predict(self, noisy, timesteps, cond, time_ids, trainable, condition):
        frames = list(noisy.unsqueeze(2).unbind(0))  # one (C, 1, h, w) frame per sample
        captions = [hidden for hidden, _ in cond.rows()]
        out = self.denoiser(frames, (1 - timesteps).to(noisy.dtype), captions, return_dict=False)[0]
        return torch.stack(out).squeeze(2)

    def pipeline_prompt_kwargs(self, cond, negative):
        """ZImagePipeline takes one (tokens, width) embedding per prompt, its real tokens only, and
        the empty negative prompt's where it guides."""
        return {"prompt_embeds": [hidden for hidden, _ in cond.rows()],
                "negative_prompt_embeds": [hidden for hidden, _ in negative.rows()]}
