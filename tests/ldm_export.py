"""Diffusers pipeline -> one safetensors file in the original (LDM / ComfyUI / A1111) layout.

The inverse of ``core.checkpoints.convert``: it lets tests build tiny single-file checkpoints from
the tiny pipelines, and records in the file's metadata the few structural values that tensor
shapes cannot tell (``STRUCTURE_KEY``), so the loader rebuilds exactly the same model.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from core.checkpoints.convert import (
    NOT_IN_SHAPES,
    SD15_CLIP_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    STRUCTURE_KEY,
    UNET_PREFIX,
    VAE_PREFIX,
)

_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_UNET_BASIC = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def _resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_to_ldm(state: dict, config) -> dict:
    """Diffusers UNet2DConditionModel state dict -> LDM UNet keys (without prefix)."""
    per = config["layers_per_block"] + 1  # resnets plus the down/upsampler slot of each level
    attn_levels = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        new = None
        if module in _UNET_BASIC:
            new = f"{_UNET_BASIC[module]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            x, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = 1 + x * per + i
            new = f"input_blocks.{n}.0.{_resnet(rest, _UNET_RESNET)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _UNET_RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            x, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = x * per + i
            new = f"output_blocks.{n}.0.{_resnet(rest, _UNET_RESNET)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            x = int(m[1])
            slot = 2 if attn_levels[x] else 1
            new = f"output_blocks.{x * per + per - 1}.{slot}.conv.{m[2]}"
        if new is None:
            raise ValueError(f"no LDM name for UNet key {key!r}")
        out[new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict, config) -> dict:
    """Diffusers AutoencoderKL state dict -> LDM VAE keys (without prefix). Attention weights
    become 1x1 convolutions, as in the original VAE."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        out[new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def _text_model_keys(state: dict) -> dict:
    """transformers >= 5.6 flattens CLIPTextModel (no ``text_model.`` level); checkpoints keep it."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in state.items()}


def clip_g_to_openclip(state: dict) -> dict:
    """CLIPTextModelWithProjection state dict -> OpenCLIP text tower keys (without prefix)."""
    state = _text_model_keys(state)
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        # OpenCLIP multiplies x @ text_projection; the linear layer stores its transpose.
        "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    rename = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layer = 0
    while f"text_model.encoder.layers.{layer}.mlp.fc1.weight" in state:
        src, dst = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
            for old, new in rename.items():
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]
        layer += 1
    return out


def _structure(pipe) -> dict:
    structure = {}
    for component, keys in NOT_IN_SHAPES.items():
        model = getattr(pipe, component, None)
        if model is None:
            continue
        config = model.config
        get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
        structure[component] = {k: get(k) for k in keys}
    return json.loads(json.dumps(structure, default=list))


def pipeline_to_ldm(pipe) -> tuple[dict, dict]:
    """(state dict in the original single-file layout, safetensors metadata) of an SD1.5 or
    SDXL diffusers pipeline."""
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    clip_l = _text_model_keys(pipe.text_encoder.state_dict())
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.update({SDXL_CLIP_L_PREFIX + k: v for k, v in clip_l.items()})
        out.update({SDXL_CLIP_G_PREFIX + k: v for k, v in clip_g_to_openclip(pipe.text_encoder_2.state_dict()).items()})
    else:
        out.update({SD15_CLIP_PREFIX + k: v for k, v in clip_l.items()})
    metadata = {STRUCTURE_KEY: json.dumps(_structure(pipe)), "format": "pt"}
    return out, metadata


def save_single_file(pipe, path: str | Path) -> Path:
    """Write ``pipe`` as one original-layout ``.safetensors`` checkpoint."""
    from safetensors.torch import save_file

    state, metadata = pipeline_to_ldm(pipe)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path
