"""``tiny-flux``: a Flux.1-dev-shaped FluxPipeline built from config, offline and seeded.

The real block structure at small widths: double-stream blocks (separate image and text weights,
joint attention) then single-stream blocks, 3-axis RoPE, the guidance embedding of the
guidance-distilled dev model; CLIP-L's pooled embedding and T5's token embeddings as the two
text encoders (T5 v1.1's gated-GELU feed-forward); a 16-channel VAE with Flux's scaling and shift
factors and no quant convs; Flux-dev's flow-matching scheduler config (dynamic shifting).
"""
from __future__ import annotations

import torch

from .tiny_models import TinySpec, _clip_config, _vae
from .tiny_tokenizer import t5_pieces, tiny_clip_tokenizer, tiny_t5_tokenizer

# Flux.1's VAE latent format (its ae.safetensors config).
FLUX_LATENT = dict(latent_channels=16, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
FLUX_SCALING_FACTOR = 0.3611
# Flux.1-dev's scheduler config.
FLUX_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
T5_TOKENS = 32  # the tiny T5's sequence length (Flux.1-dev: 512)


def _t5(hidden: int, layers: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(t5_pieces()), d_model=hidden, d_kv=hidden // 4, d_ff=hidden * 2, num_layers=layers,
        num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=T5_TOKENS, pad_token_id=0, eos_token_id=1,
    ))


def tiny_flux_components(seed: int = 0, spec: TinySpec = TinySpec()) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    heads, head_dim = 2, 16
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=FLUX_LATENT["latent_channels"] * 4,  # a token is a 2×2 patch of latent cells
        num_layers=2,  # double-stream blocks
        num_single_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=spec.text_hidden,  # T5's width
        pooled_projection_dim=spec.text_hidden,  # CLIP's width
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim, as (16, 56, 56) does for 128
    )
    vae = _vae(spec.vae_channels, scaling_factor=FLUX_SCALING_FACTOR, **FLUX_LATENT)
    return dict(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=CLIPTextModel(_clip_config(spec.text_hidden, spec.text_layers)).eval(),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_t5(spec.text_hidden, spec.text_layers).eval(),
        tokenizer_2=tiny_t5_tokenizer(T5_TOKENS),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE),
    )
