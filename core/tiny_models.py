"""Tiny SD1.5-, SDXL- and Flux.1-shaped diffusers models built from config, offline and seeded.

They keep the block structure of the real architectures (SD1.5: three cross-attention levels
and a plain one, one text encoder; SDXL: a plain level then cross-attention levels with a
transformer depth above one, two text encoders whose hidden states are concatenated, and the
``text_time`` added conditioning), so code that runs on them runs on the real models. Only the
widths are small. Building one takes well under a second on a CPU.

``tiny-flux`` is Flux.1-dev at small widths: double-stream blocks (separate image and text
weights, joint attention) then single-stream blocks, 3-axis RoPE, the guidance embedding of the
guidance-distilled dev model; CLIP-L's pooled embedding and T5's token embeddings as the two
text encoders (T5 v1.1's gated-GELU feed-forward); a 16-channel VAE with Flux's scaling and shift
factors and no quant convs; Flux-dev's flow-matching scheduler config (dynamic shifting).

``tiny-zimage`` is Z-Image (Turbo) at small widths: its single-stream transformer with the noise
and context refiner blocks in front of the main layers, 3-axis RoPE, 2×2 patches; a Qwen3 text
encoder with Qwen's byte-level BPE tokenizer and chat template; Flux's 16-channel VAE format (the
one Z-Image uses); Z-Image-Turbo's scheduler config (a fixed shift of 3).

``tiny-sd3`` is SD3.5 Medium at small widths: joint (MMDiT) blocks whose first ones add a second,
image-only attention (MMDiT-X's dual attention), RMS q/k norms, the last block's text stream
ending before its attention output; CLIP-L- and CLIP-G-like encoders with projections (their
penultimate states concatenated and padded to T5's width, their pooled embeddings side by side)
and a T5 encoder wider than both; SD3's 16-channel VAE latent format; the fixed flow shift 3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .tiny_tokenizer import t5_pieces, tiny_clip_tokenizer, tiny_qwen_tokenizer, tiny_t5_tokenizer

TINY_BASES = ("tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-zimage", "tiny-sd3")

# Noise schedule of SD1.5 and SDXL (scaled-linear betas over 1000 steps).
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


@dataclass(frozen=True)
class TinySpec:
    """Widths of a tiny model; the structure comes from the architecture it imitates."""

    text_hidden: int = 32
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 32, 64, 64)
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)


def _clip_config(hidden: int, layers: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    from .tiny_tokenizer import vocabulary

    vocab, _ = vocabulary()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=projection or hidden,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def _vae(channels: tuple[int, ...], scaling_factor: float, **family_options):
    """``family_options``: what sets a family's VAE apart (Flux: 16 latent channels, a shift
    factor, no quant convs)."""
    from diffusers import AutoencoderKL

    # Four levels: three downsamplings, the /8 latent of the real VAEs.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        **{"latent_channels": 4, **family_options},
    )
    return _calibrate_posterior(vae)


POSTERIOR_STD = 0.02


@torch.no_grad()
def _calibrate_posterior(vae):
    """Give a random VAE the latent statistics of a trained one: posterior means with a std of
    1 / scaling_factor (what the factor is defined from), a mean of shift_factor where the VAE
    has one (Flux), and a narrow posterior. Randomly initialised, the means sit near 0 and the
    posterior std near 1, so every sampled latent is mostly sampling noise and no image could be
    told from another in training."""
    probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # the last layer that writes the moments: quant_conv, or the encoder's output conv without it
    conv = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    moments = conv(vae.encoder(probe)) if vae.quant_conv is not None else vae.encoder(probe)
    half = vae.config.latent_channels
    means = moments[:, :half]
    gain = (1.0 / vae.config.scaling_factor) / means.std()
    conv.weight[:half] *= gain
    conv.bias[:half] *= gain
    if vae.config.shift_factor is not None:
        conv.bias[:half] += vae.config.shift_factor - means.mean() * gain
    conv.weight[half:] = 0.0
    conv.bias[half:] = 2.0 * math.log(POSTERIOR_STD)  # log-variance
    return vae


def tiny_sd15_components(seed: int = 0, spec: TinySpec = TinySpec()) -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    ch = spec.unet_channels
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=ch,
        layers_per_block=2,
        attention_head_dim=4,
        cross_attention_dim=spec.text_hidden,
        norm_num_groups=8,
    )
    vae = _vae(spec.vae_channels, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(_clip_config(spec.text_hidden, spec.text_layers))
    scheduler = DDIMScheduler(
        **SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_components(seed: int = 0, spec: TinySpec = TinySpec()) -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    hidden_1, hidden_2 = spec.text_hidden, spec.text_hidden * 2
    time_dim = 8
    ch = spec.unet_channels[:3]
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=ch,
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=hidden_1 + hidden_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # pooled projection of text encoder 2 + six size/crop numbers embedded at time_dim each
        projection_class_embeddings_input_dim=hidden_2 + 6 * time_dim,
        norm_num_groups=8,
    )
    vae = _vae(spec.vae_channels, scaling_factor=0.13025)
    text_encoder = CLIPTextModel(_clip_config(hidden_1, spec.text_layers))
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_config(hidden_2, spec.text_layers, projection=hidden_2)
    )
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading")
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=scheduler,
    )


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


# Z-Image-Turbo's scheduler config: a fixed shift, no resolution-dependent one.
ZIMAGE_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
QWEN_TOKENS = 64  # the tiny tokenizer's limit (Z-Image: 512 tokens of the chat-formatted prompt)


def tiny_zimage_components(seed: int = 0, spec: TinySpec = TinySpec()) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from .tiny_tokenizer import qwen_vocabulary

    torch.manual_seed(seed)
    heads, head_dim = 2, 32
    transformer = ZImageTransformer2DModel(
        in_channels=FLUX_LATENT["latent_channels"],  # the transformer patchifies 2×2 itself
        dim=heads * head_dim,
        n_layers=2,
        n_refiner_layers=2,  # noise and context refiners, as many as the real model's
        n_heads=heads,
        n_kv_heads=heads,
        cap_feat_dim=spec.text_hidden,  # the text encoder's width
        axes_dims=[8, 12, 12],  # sums to the head dim, as (32, 48, 48) does for 128
    )
    vocab, _ = qwen_vocabulary()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(vocab), hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 2,
        num_hidden_layers=spec.text_layers + 1,  # Z-Image reads the second-to-last layer's states
        num_attention_heads=4, num_key_value_heads=2, head_dim=spec.text_hidden // 4,
        max_position_embeddings=QWEN_TOKENS, pad_token_id=vocab["<|endoftext|>"],
    ))
    return dict(
        transformer=transformer.eval(),
        vae=_vae(spec.vae_channels, scaling_factor=FLUX_SCALING_FACTOR, **FLUX_LATENT).eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_qwen_tokenizer(QWEN_TOKENS),
        scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULE),
    )


# SD3 / SD3.5's VAE latent format and SD3.5's scheduler config.
SD3_LATENT = dict(latent_channels=16, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
SD3_SCALING_FACTOR = 1.5305
SD3_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)


def tiny_sd3_components(seed: int = 0, spec: TinySpec = TinySpec()) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # widths in SD3's proportions: CLIP-L < CLIP-G, and T5 wider than both together (768, 1280, 4096)
    clip_l, clip_g, t5 = spec.text_hidden, spec.text_hidden * 2, spec.text_hidden * 4
    heads, head_dim = 2, 16
    transformer = SD3Transformer2DModel(
        sample_size=8,  # latent side of the default 64-pixel image
        patch_size=2,
        in_channels=SD3_LATENT["latent_channels"],
        out_channels=SD3_LATENT["latent_channels"],
        num_layers=3,
        dual_attention_layers=(0, 1),  # MMDiT-X: 3.5 Medium's first 13 of 24 blocks
        qk_norm="rms_norm",
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=clip_l + clip_g,
        pos_embed_max_size=128,  # positions for up to 128×128 patches: 2048-pixel sides (3.5 Large: 192)
    )
    vae = _vae(spec.vae_channels, scaling_factor=SD3_SCALING_FACTOR, **SD3_LATENT)
    return dict(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=CLIPTextModelWithProjection(_clip_config(clip_l, spec.text_layers, projection=clip_l)).eval(),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip_g, spec.text_layers, projection=clip_g)).eval(),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_t5(t5, spec.text_layers).eval(),
        tokenizer_3=tiny_t5_tokenizer(T5_TOKENS),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE),
    )


def build_tiny_pipeline(base: str, seed: int = 0):
    """A working StableDiffusionPipeline (``tiny-sd15``), StableDiffusionXLPipeline (``tiny-sdxl``),
    FluxPipeline (``tiny-flux``), ZImagePipeline (``tiny-zimage``) or StableDiffusion3Pipeline (``tiny-sd3``)
    with seeded random weights."""
    from diffusers import (FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           ZImagePipeline)

    if base == "tiny-sd15":
        pipe = StableDiffusionPipeline(**tiny_sd15_components(seed))
    elif base == "tiny-sdxl":
        pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed))
    elif base == "tiny-flux":
        pipe = FluxPipeline(**tiny_flux_components(seed))
    elif base == "tiny-zimage":
        pipe = ZImagePipeline(**tiny_zimage_components(seed))
    elif base == "tiny-sd3":
        pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed))
    else:
        raise ValueError(f"unknown tiny base {base!r}; expected one of {', '.join(TINY_BASES)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe
