"""ComfyUI's diffusion-model and text-encoder file layouts -> diffusers configs and state dicts,
for Flux.1 (BFL's layout), SD3 / SD3.5 (Stability's MMDiT layout) and Z-Image (ComfyUI's
NextDiT layout).

Configs are built as ``convert.py`` builds the UNet's: the shipped config (``core/configs``),
then every width and depth the tensor shapes tell, then what this pack's exporter recorded in the
file's metadata (``STRUCTURE_KEY``) for the few values shapes cannot tell (RoPE axes, SD3's
default sample size); real files carry none and keep the published values.

Key renaming: diffusers' own single-file converters for SD3 and Z-Image; Flux's is written here
because diffusers' (``convert_flux_transformer_checkpoint_to_diffusers``) splits the single
blocks' fused projection at Flux.1's fixed width (3072), so no other width loads through it.
"""
from __future__ import annotations

import math

import torch

from .convert import _count, shipped_config

DIFFUSION_MODEL_PREFIX = "model.diffusion_model."

# What identifies each family's diffusion model (ComfyUI's model_detection.py reads the same keys).
FAMILY_MARKERS = {
    "flux": "double_blocks.0.img_attn.qkv.weight",
    "sd3": "joint_blocks.0.context_block.attn.qkv.weight",
    "zimage": "noise_refiner.0.attention.qkv.weight",
}
FAMILY_NAMES = {"flux": "Flux.1", "sd3": "SD3.5", "zimage": "Z-Image"}


def strip_diffusion_prefix(keys_or_state):
    """ComfyUI saves diffusion models bare or under ``model.diffusion_model.`` (full checkpoints)."""
    if isinstance(keys_or_state, dict):
        if any(k.startswith(DIFFUSION_MODEL_PREFIX) for k in keys_or_state):
            return {k[len(DIFFUSION_MODEL_PREFIX):]: v for k, v in keys_or_state.items()
                    if k.startswith(DIFFUSION_MODEL_PREFIX)}
        return keys_or_state
    keys = list(keys_or_state)
    if any(k.startswith(DIFFUSION_MODEL_PREFIX) for k in keys):
        return [k[len(DIFFUSION_MODEL_PREFIX):] for k in keys if k.startswith(DIFFUSION_MODEL_PREFIX)]
    return keys


def dit_family(keys) -> str | None:
    """``flux``, ``sd3`` or ``zimage`` from a diffusion model's key names, else None."""
    keys = set(strip_diffusion_prefix(keys))
    for family, marker in FAMILY_MARKERS.items():
        if marker in keys:
            if family == "flux" and "double_stream_modulation_img.lin.weight" in keys:
                raise ValueError("this is a Flux.2 diffusion model; only Flux.1 (dev, schnell) is supported")
            if family == "zimage" and "siglip_embedder.0.weight" in keys:
                raise ValueError("this is a Z-Image Omni diffusion model; only Z-Image (Turbo, base) is supported")
            return family
    return None


# ---- Flux.1 ----------------------------------------------------------------------------------
_FLUX_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_FLUX_DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
_FLUX_DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FLUX_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out",
                "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
# The single blocks' linear1 fuses q, k, v (one width each) and the MLP's input projection.
_FLUX_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def _shift_scale_to_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation emits (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift)."""
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def convert_flux(state: dict) -> dict:
    """BFL-layout Flux.1 transformer state dict -> FluxTransformer2DModel keys, at any width."""
    state = strip_diffusion_prefix(state)
    width = int(state["img_in.weight"].shape[0])
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        param = "weight" if param == "scale" else param  # RMSNorm scales are weights in diffusers
        head, _, rest = module.partition(".")
        if module in _FLUX_TOP:
            out[f"{_FLUX_TOP[module]}.{param}"] = value
        elif module == "final_layer.adaLN_modulation.1":
            out[f"norm_out.linear.{param}"] = _shift_scale_to_scale_shift(value)
        elif head == "double_blocks":
            index, _, name = rest.partition(".")
            prefix = f"transformer_blocks.{index}."
            if name in _FLUX_DOUBLE_QKV:
                for target, part in zip(_FLUX_DOUBLE_QKV[name], value.chunk(3, dim=0)):
                    out[f"{prefix}{target}.{param}"] = part
            elif name in _FLUX_DOUBLE:
                out[f"{prefix}{_FLUX_DOUBLE[name]}.{param}"] = value
            else:
                raise ValueError(f"Flux diffusion model: no diffusers name for {key!r}")
        elif head == "single_blocks":
            index, _, name = rest.partition(".")
            prefix = f"single_transformer_blocks.{index}."
            if name == "linear1":
                sizes = (width, width, width, value.shape[0] - 3 * width)
                for target, part in zip(_FLUX_SINGLE_FUSED, value.split(sizes, dim=0)):
                    out[f"{prefix}{target}.{param}"] = part
            elif name in _FLUX_SINGLE:
                out[f"{prefix}{_FLUX_SINGLE[name]}.{param}"] = value
            else:
                raise ValueError(f"Flux diffusion model: no diffusers name for {key!r}")
        else:
            raise ValueError(f"Flux diffusion model: no diffusers name for {key!r}")
    return out


def _config_reader(shipped: str):
    """A config function ``(shapes, structure=None) -> config`` for a transformer: the shipped
    config ``shipped``, then what the file's metadata says (``structure``), then what the decorated
    ``read(shapes, keys, config)`` reads from the tensor shapes (``{key: shape}``, unprefixed)."""
    def decorate(read):
        def config_of(shapes: dict, structure: dict | None = None) -> dict:
            shapes = strip_diffusion_prefix(shapes)
            config = shipped_config(shipped)
            config.update((structure or {}).get("transformer", {}))
            config.update(read(shapes, list(shapes), config))
            return config

        config_of.__doc__ = read.__doc__
        return config_of

    return decorate


@_config_reader("flux_transformer")
def flux_config(shapes, keys, config) -> dict:
    """FluxTransformer2DModel config from the BFL-layout tensor shapes."""
    width, in_channels = shapes["img_in.weight"]
    # BFL's files name the q/k RMSNorm gains .scale; ComfyUI (0.33) saves them as .weight
    norm = "double_blocks.0.img_attn.norm.query_norm."
    head_dim = (shapes.get(norm + "scale") or shapes[norm + "weight"])[0]
    out_channels = shapes["final_layer.linear.weight"][0]
    return dict(
        in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,  # None: the same
        num_layers=_count(keys, "double_blocks.{}."), num_single_layers=_count(keys, "single_blocks.{}."),
        attention_head_dim=head_dim, num_attention_heads=width // head_dim,
        joint_attention_dim=shapes["txt_in.weight"][1], pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
        guidance_embeds="guidance_in.in_layer.weight" in shapes,  # dev is guidance-distilled; schnell is not
    )


def _diffusers_converter(name: str):
    """One of diffusers' single-file converters (they pop from the dict they are given: a copy)."""
    def convert(state: dict) -> dict:
        from diffusers.loaders import single_file_utils

        return getattr(single_file_utils, name)(dict(strip_diffusion_prefix(state)))

    return convert


# ---- SD3 / SD3.5 -----------------------------------------------------------------------------
convert_sd3 = _diffusers_converter("convert_sd3_transformer_checkpoint_to_diffusers")


@_config_reader("sd3_transformer")
def sd3_config(shapes, keys, config) -> dict:
    """SD3Transformer2DModel config from the MMDiT tensor shapes."""
    width, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    has_qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    head_dim = shapes["joint_blocks.0.x_block.attn.ln_q.weight"][0] if has_qk_norm else config["attention_head_dim"]
    return dict(
        patch_size=patch, in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0] // patch ** 2,
        num_layers=_count(keys, "joint_blocks.{}."), attention_head_dim=head_dim, num_attention_heads=width // head_dim,
        joint_attention_dim=shapes["context_embedder.weight"][1], caption_projection_dim=shapes["context_embedder.weight"][0],
        pooled_projection_dim=shapes["y_embedder.mlp.0.weight"][1],
        pos_embed_max_size=math.isqrt(shapes["pos_embed"][1]),
        dual_attention_layers=tuple(i for i in range(_count(keys, "joint_blocks.{}."))
                                    if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),  # MMDiT-X (3.5 Medium)
        qk_norm="rms_norm" if has_qk_norm else None,
    )


# ---- Z-Image ---------------------------------------------------------------------------------
convert_zimage = _diffusers_converter("convert_z_image_transformer_checkpoint_to_diffusers")


@_config_reader("zimage_transformer")
def zimage_config(shapes, keys, config) -> dict:
    """ZImageTransformer2DModel config from ComfyUI's NextDiT-layout tensor shapes."""
    dim, cap_feat_dim = shapes["cap_embedder.1.weight"]
    head_dim = shapes["layers.0.attention.q_norm.weight"][0]
    patch = config["all_patch_size"][0] ** 2 * config["all_f_patch_size"][0]
    return dict(
        dim=dim, cap_feat_dim=cap_feat_dim, n_heads=dim // head_dim, n_kv_heads=dim // head_dim,
        n_layers=_count(keys, "layers.{}."), n_refiner_layers=_count(keys, "noise_refiner.{}."),
        in_channels=shapes["x_embedder.weight"][1] // patch,
    )


CONVERTERS = {"flux": (flux_config, convert_flux), "sd3": (sd3_config, convert_sd3),
              "zimage": (zimage_config, convert_zimage)}


# ---- text encoders ---------------------------------------------------------------------------
# Prefixes under which ComfyUI and Stability's files hold a transformers-layout encoder: bare
# (clip_l.safetensors, t5xxl_fp16.safetensors, qwen_3_4b.safetensors) or inside an SD3.5 checkpoint.
SD3_BUNDLED = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
               "t5": "text_encoders.t5xxl.transformer."}


def encoder_kind(shapes: dict) -> str | None:
    """``clip``, ``t5`` or ``qwen3`` from a transformers-layout text encoder's keys (ComfyUI's
    detect_te_model reads the same keys); which CLIP it is, the caller tells from the width."""
    if "text_model.encoder.layers.0.mlp.fc1.weight" in shapes:
        return "clip"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
        if "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" not in shapes:
            raise ValueError("this T5 has the old (non-gated) feed-forward; Flux and SD3 use T5 v1.1 (T5-XXL)")
        return "t5"
    if "model.layers.0.self_attn.q_norm.weight" in shapes:
        return "qwen3"
    return None


def clip_width(shapes: dict) -> int:
    return int(shapes["text_model.embeddings.token_embedding.weight"][1])


def t5_config(shapes: dict, structure: dict | None = None) -> dict:
    keys = list(shapes)
    config = shipped_config("t5_xxl_text_encoder")
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    config.update(
        vocab_size=vocab, d_model=d_model, num_heads=heads,
        d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=_count(keys, "encoder.block.{}."), relative_attention_num_buckets=buckets,
    )
    config.update((structure or {}).get("t5_encoder", {}))
    return config


def convert_t5(state: dict) -> dict:
    """T5EncoderModel keeps the embedding twice (shared, encoder.embed_tokens); files may hold one."""
    state = dict(state)
    if "encoder.embed_tokens.weight" not in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    state.setdefault("shared.weight", state["encoder.embed_tokens.weight"])
    return state


def qwen3_config(shapes: dict, structure: dict | None = None) -> dict:
    keys = list(shapes)
    config = shipped_config("qwen3_4b_text_encoder")
    vocab, hidden = shapes["model.embed_tokens.weight"]
    head_dim = shapes["model.layers.0.self_attn.q_norm.weight"][0]
    config.update(
        vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
        num_attention_heads=shapes["model.layers.0.self_attn.q_proj.weight"][0] // head_dim,
        num_key_value_heads=shapes["model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
        intermediate_size=shapes["model.layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=_count(keys, "model.layers.{}."),
    )
    config.update((structure or {}).get("qwen3_encoder", {}))
    return config


def convert_qwen3(state: dict) -> dict:
    """Qwen3 causal-LM layout (``model.*``, maybe ``lm_head``) -> Qwen3Model keys."""
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
