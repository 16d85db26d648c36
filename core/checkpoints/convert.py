"""Original (LDM / ComfyUI / A1111) single-file layout -> diffusers configs and state dicts.

The key renaming is done by diffusers' own single-file helpers; what they need and cannot know
offline is the config of each component. Here it is built in three layers:

1. the published architecture (``core/configs/*.json``),
2. every width and depth the checkpoint's tensor shapes tell (so tiny checkpoints load too),
3. the few values shapes cannot tell (group-norm groups, attention heads, activation, default
   sample size) from ``STRUCTURE_KEY`` in the file's metadata, which this pack's exporter writes
   (``tests/ldm_export.py``); a real checkpoint has none and gets the published values.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."

# safetensors metadata key holding {component: {config key: value}} for what shapes cannot tell.
STRUCTURE_KEY = "fairhuman.structure"
NOT_IN_SHAPES = {
    "unet": ("norm_num_groups", "attention_head_dim", "sample_size"),
    "vae": ("norm_num_groups", "sample_size"),
    "text_encoder": ("num_attention_heads", "hidden_act"),
    "text_encoder_2": ("num_attention_heads", "hidden_act"),
    # ComfyUI's separate DiT files (dit_convert.py): the diffusion model, a T5 or Qwen3 encoder file
    "transformer": ("axes_dims_rope", "sample_size", "attention_head_dim", "axes_dims", "axes_lens"),
    "t5_encoder": ("relative_attention_max_distance",),
    "qwen3_encoder": ("max_position_embeddings", "rope_theta"),
}
# Buffers and extras that real checkpoints carry and diffusers/transformers models do not keep.
_IGNORED_SUFFIXES = ("position_ids", "logit_scale")

_CONFIG_DIR = Path(__file__).parent.parent / "configs"


@lru_cache(maxsize=None)
def _shipped(name: str) -> dict:
    return json.loads((_CONFIG_DIR / f"{name}.json").read_text())


def shipped_config(name: str) -> dict:
    """A copy of one shipped config (``sd15_unet``, ``sdxl_vae``, ``clip_l_text_encoder`` ...),
    without the ``_class_name`` / ``architectures`` bookkeeping keys."""
    config = copy.deepcopy(_shipped(name))
    for key in ("_class_name", "architectures", "model_type"):
        config.pop(key, None)
    return config


def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _count(keys, pattern: str) -> int:
    """How many consecutive indices ``pattern.format(i)`` occur as a key prefix, from 0."""
    n = 0
    while any(k.startswith(pattern.format(n)) for k in keys):
        n += 1
    return n


# ---- UNet ------------------------------------------------------------------------------------
def unet_config(ldm_unet: dict, arch: str, structure: dict | None = None) -> dict:
    """Diffusers UNet2DConditionModel config of an LDM UNet state dict (keys without the
    ``model.diffusion_model.`` prefix)."""
    keys = list(ldm_unet)
    config = shipped_config(f"{arch}_unet")
    conv_in = ldm_unet["input_blocks.0.0.weight"]
    config["in_channels"] = int(conv_in.shape[1])
    config["out_channels"] = int(ldm_unet["out.2.weight"].shape[0])

    # Walk the input blocks: resnets (with an optional transformer) until a downsampler ends a level.
    channels, depths, has_attention, per_level = [], [], [], []
    n_inputs = _count(keys, "input_blocks.{}.")
    level_resnets = 0
    for i in range(1, n_inputs):
        block = f"input_blocks.{i}."
        if f"{block}0.op.weight" in ldm_unet:
            per_level.append(level_resnets)
            level_resnets = 0
            continue
        out_width = int(ldm_unet[f"{block}0.out_layers.3.weight"].shape[0])
        if level_resnets == 0:
            channels.append(out_width)
            depths.append(0)
            has_attention.append(False)
        level_resnets += 1
        depth = _count(keys, f"{block}1.transformer_blocks.{{}}.")
        if depth:
            has_attention[-1] = True
            depths[-1] = depth
    per_level.append(level_resnets)
    if len(set(per_level)) != 1:
        raise ValueError(f"UNet levels have different resnet counts {per_level}; not an SD UNet")

    config["block_out_channels"] = channels
    config["layers_per_block"] = per_level[0]
    config["down_block_types"] = [
        "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention
    ]
    config["up_block_types"] = [
        "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)
    ]
    # Levels without attention keep a placeholder depth of 1, as the published SDXL config does.
    config["transformer_layers_per_block"] = [d or 1 for d in depths]
    mid_depth = _count(keys, "middle_block.1.transformer_blocks.{}.")
    if mid_depth != config["transformer_layers_per_block"][-1]:
        raise ValueError(
            f"middle block has {mid_depth} transformer layers, the last level "
            f"{config['transformer_layers_per_block'][-1]}; diffusers cannot represent that"
        )
    attn = next(k for k in keys if k.endswith("transformer_blocks.0.attn2.to_k.weight"))
    config["cross_attention_dim"] = int(ldm_unet[attn].shape[1])
    proj_in = next(k for k in keys if k.endswith(".proj_in.weight"))
    config["use_linear_projection"] = ldm_unet[proj_in].ndim == 2
    if "label_emb.0.0.weight" in ldm_unet:
        config["projection_class_embeddings_input_dim"] = int(ldm_unet["label_emb.0.0.weight"].shape[1])

    # Head counts are not in the weights: SD1.5 uses 8 heads everywhere, SDXL 64-channel heads.
    if arch == "sd15":
        config["attention_head_dim"] = 8
    else:
        config["attention_head_dim"] = [max(c // 64, 1) for c in channels]
    config.update((structure or {}).get("unet", {}))
    return config


def set_sdxl_time_embedding(config: dict, pooled_dim: int) -> None:
    """SDXL's added conditioning is the pooled text_encoder_2 embedding plus six size/crop
    numbers embedded at ``addition_time_embed_dim`` channels each."""
    extra = config["projection_class_embeddings_input_dim"] - pooled_dim
    if extra <= 0 or extra % 6:
        raise ValueError(
            f"SDXL added-conditioning width {config['projection_class_embeddings_input_dim']} does "
            f"not fit a pooled text embedding of {pooled_dim} plus six time embeddings"
        )
    config["addition_time_embed_dim"] = extra // 6


def convert_unet(checkpoint: dict, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(checkpoint, config)


# ---- VAE -------------------------------------------------------------------------------------
def vae_config(ldm_vae: dict, arch: str, structure: dict | None = None) -> dict:
    """Diffusers AutoencoderKL config of an LDM VAE state dict (keys without the prefix)."""
    keys = list(ldm_vae)
    config = shipped_config(f"{arch}_vae")
    levels = _count(keys, "encoder.down.{}.")
    config["block_out_channels"] = [
        int(ldm_vae[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)
    ]
    config["down_block_types"] = ["DownEncoderBlock2D"] * levels
    config["up_block_types"] = ["UpDecoderBlock2D"] * levels
    config["layers_per_block"] = _count(keys, "encoder.down.0.block.{}.")
    config["in_channels"] = int(ldm_vae["encoder.conv_in.weight"].shape[1])
    config["out_channels"] = int(ldm_vae["decoder.conv_out.weight"].shape[0])
    config["latent_channels"] = int(ldm_vae["decoder.conv_in.weight"].shape[1])
    # Flux's and SD3's VAEs (16 channels) have no quant convs.
    config["use_quant_conv"] = "quant_conv.weight" in ldm_vae
    config["use_post_quant_conv"] = "post_quant_conv.weight" in ldm_vae
    config.update((structure or {}).get("vae", {}))
    return config


def convert_vae(checkpoint: dict, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(checkpoint, config)


# ---- text encoders ---------------------------------------------------------------------------
def convert_clip_l(checkpoint: dict) -> dict:
    """HF-layout CLIP under an LDM prefix -> ``text_model.*`` keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    return convert_ldm_clip_checkpoint(checkpoint)


def convert_clip_g(checkpoint: dict) -> dict:
    """OpenCLIP-layout text tower (SDXL's second encoder) -> ``text_model.*`` keys."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    if SDXL_CLIP_G_PREFIX + "text_projection" not in checkpoint:
        raise ValueError(f"SDXL checkpoint lacks {SDXL_CLIP_G_PREFIX}text_projection")
    # The helper reads the width from text_projection; its model argument is only a fallback.
    return convert_open_clip_checkpoint(None, checkpoint, prefix=SDXL_CLIP_G_PREFIX)


def clip_config(state: dict, base: str, component: str, structure: dict | None = None) -> dict:
    """CLIPTextConfig kwargs of a converted text encoder (``text_model.*`` keys)."""
    keys = list(state)
    config = shipped_config(base)
    token = state["text_model.embeddings.token_embedding.weight"]
    config["vocab_size"], config["hidden_size"] = (int(s) for s in token.shape)
    config["max_position_embeddings"] = int(
        state["text_model.embeddings.position_embedding.weight"].shape[0]
    )
    config["num_hidden_layers"] = _count(keys, "text_model.encoder.layers.{}.")
    config["intermediate_size"] = int(state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    if "text_projection.weight" in state:
        config["projection_dim"] = int(state["text_projection.weight"].shape[0])
    else:
        config["projection_dim"] = config["hidden_size"]
    # Both CLIP towers use 64-channel heads.
    config["num_attention_heads"] = max(config["hidden_size"] // 64, 1)
    config.update((structure or {}).get(component, {}))
    return config


def drop_ignored(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}


def parse_structure(metadata: dict | None) -> dict:
    raw = (metadata or {}).get(STRUCTURE_KEY)
    if not raw:
        return {}
    try:
        structure = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"metadata {STRUCTURE_KEY!r} is not JSON: {err}") from None
    for component, values in structure.items():
        allowed = NOT_IN_SHAPES.get(component, ())
        unknown = set(values) - set(allowed)
        if unknown:
            raise ValueError(f"metadata {STRUCTURE_KEY!r}: unexpected keys {sorted(unknown)} for {component}")
    return structure


def load_into(model: torch.nn.Module, state: dict, dtype: torch.dtype, what: str) -> torch.nn.Module:
    """Load ``state`` into a model built on the meta device; every parameter must be covered.
    The tensors are cast to ``dtype`` here (floating tensors only) and adopted without a copy."""
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {sorted(missing)[:3]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})")
        raise ValueError(f"{what}: checkpoint does not match the inferred architecture: {'; '.join(detail)}")
    model.load_state_dict({k: _own(v, dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()



ALIGNMENT = 64  # bytes: what CPU kernels' vectorised paths assume


def _own(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` (floating tensors only), at an aligned address: tensors read from a
    file can sit at unaligned ones, where CPU kernels take other code paths and the model's outputs
    drift from the same weights' by ~1e-7. Aligned tensors already in ``dtype`` are adopted as they
    are, so a model read in its file's dtype does not take twice the file's memory."""
    out = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if out.data_ptr() == tensor.data_ptr() and tensor.data_ptr() % ALIGNMENT:
        return out.clone()
    return out
