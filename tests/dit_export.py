"""Tiny Flux / SD3 / Z-Image diffusers pipelines -> the separate files ComfyUI loads them from.

The inverse of ``core.checkpoints.dit_convert``, written from ComfyUI's layouts (the diffusion
model as ComfyUI's model_detection.py reads it: BFL's Flux keys, Stability's MMDiT keys,
ComfyUI's NextDiT keys for Z-Image; each text encoder in transformers' layout as its CLIP loaders
take it; the VAE in the LDM layout). Each file's metadata records what tensor shapes cannot tell
(``STRUCTURE_KEY``), as ``ldm_export.py`` does for SD checkpoints.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from core.checkpoints.convert import STRUCTURE_KEY
from ldm_export import _text_model_keys, vae_to_ldm


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _fuse(state: dict, out: dict, sources: list[str], target: str) -> None:
    """Concatenate ``sources`` (module names) along rows into ``target`` for each parameter."""
    for param in ("weight", "bias"):
        if f"{sources[0]}.{param}" in state:
            out[f"{target}.{param}"] = torch.cat([state.pop(f"{s}.{param}") for s in sources])


# ---- Flux (BFL's layout) ---------------------------------------------------------------------
_FLUX_TOP = [("x_embedder", "img_in"), ("context_embedder", "txt_in"),
             ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
             ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
             ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
             ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
             ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
             ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
             ("proj_out", "final_layer.linear")]
_FLUX_DOUBLE = [("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")]
_FLUX_DOUBLE_NORMS = [("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
                      ("attn.norm_added_q", "txt_attn.norm.query_norm"), ("attn.norm_added_k", "txt_attn.norm.key_norm")]


def flux_to_bfl(state: dict) -> dict:
    state, out = dict(state), {}
    blocks = {int(m[1]) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    singles = {int(m[1]) for k in state if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))}
    for src, dst in _FLUX_TOP:
        _fuse(state, out, [src], dst)
    for param in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(state.pop(f"norm_out.linear.{param}"))
    for i in blocks:
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        _fuse(state, out, [f"{src}attn.to_{x}" for x in "qkv"], f"{dst}img_attn.qkv")
        _fuse(state, out, [f"{src}attn.add_{x}_proj" for x in "qkv"], f"{dst}txt_attn.qkv")
        for a, b in _FLUX_DOUBLE:
            _fuse(state, out, [src + a], dst + b)
        for a, b in _FLUX_DOUBLE_NORMS:
            out[f"{dst}{b}.scale"] = state.pop(f"{src}{a}.weight")
    for i in singles:
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        _fuse(state, out, [f"{src}attn.to_{x}" for x in "qkv"] + [f"{src}proj_mlp"], f"{dst}linear1")
        _fuse(state, out, [f"{src}norm.linear"], f"{dst}modulation.lin")
        _fuse(state, out, [f"{src}proj_out"], f"{dst}linear2")
        out[f"{dst}norm.query_norm.scale"] = state.pop(f"{src}attn.norm_q.weight")
        out[f"{dst}norm.key_norm.scale"] = state.pop(f"{src}attn.norm_k.weight")
    assert not state, f"unexported Flux keys {sorted(state)[:5]}"
    return out


# ---- SD3 (Stability's MMDiT layout) ----------------------------------------------------------
def sd3_to_mmdit(state: dict) -> dict:
    state, out = dict(state), {}
    layers = {int(m[1]) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    out["pos_embed"] = state.pop("pos_embed.pos_embed")
    for src, dst in [("pos_embed.proj", "x_embedder.proj"), ("context_embedder", "context_embedder"),
                     ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                     ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
                     ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
                     ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"), ("proj_out", "final_layer.linear")]:
        _fuse(state, out, [src], dst)
    for param in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(state.pop(f"norm_out.linear.{param}"))
    for i in sorted(layers):
        src, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == max(layers)
        _fuse(state, out, [f"{src}attn.to_{q}" for q in "qkv"], f"{x}attn.qkv")
        _fuse(state, out, [f"{src}attn.add_{q}_proj" for q in "qkv"], f"{c}attn.qkv")
        _fuse(state, out, [f"{src}attn2.to_{q}" for q in "qkv"], f"{x}attn2.qkv")
        for a, b in [("attn.norm_q", f"{x}attn.ln_q"), ("attn.norm_k", f"{x}attn.ln_k"),
                     ("attn.norm_added_q", f"{c}attn.ln_q"), ("attn.norm_added_k", f"{c}attn.ln_k"),
                     ("attn2.norm_q", f"{x}attn2.ln_q"), ("attn2.norm_k", f"{x}attn2.ln_k"),
                     ("attn.to_out.0", f"{x}attn.proj"), ("attn.to_add_out", f"{c}attn.proj"),
                     ("attn2.to_out.0", f"{x}attn2.proj"), ("norm1.linear", f"{x}adaLN_modulation.1"),
                     ("ff.net.0.proj", f"{x}mlp.fc1"), ("ff.net.2", f"{x}mlp.fc2"),
                     ("ff_context.net.0.proj", f"{c}mlp.fc1"), ("ff_context.net.2", f"{c}mlp.fc2")]:
            _fuse(state, out, [src + a], b)
        for param in ("weight", "bias"):  # the last block's text stream ends in a continuous AdaLN
            value = state.pop(f"{src}norm1_context.linear.{param}")
            out[f"{c}adaLN_modulation.1.{param}"] = _swap_halves(value) if last else value
    assert not state, f"unexported SD3 keys {sorted(state)[:5]}"
    return out


# ---- Z-Image (ComfyUI's NextDiT layout) ------------------------------------------------------
def zimage_to_nextdit(state: dict) -> dict:
    state, out = dict(state), {}
    for key in [k for k in state if k.endswith(".attention.to_q.weight")]:
        block = key[: -len(".attention.to_q.weight")]
        _fuse(state, out, [f"{block}.attention.to_{x}" for x in "qkv"], f"{block}.attention.qkv")
    for key, value in state.items():
        key = (key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
               .replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
               .replace(".attention.norm_k.", ".attention.k_norm."))
        out[key] = value
    return out


# ---- files -----------------------------------------------------------------------------------
def _save(state: dict, path: Path, structure: dict) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {STRUCTURE_KEY: json.dumps(structure, default=list), "format": "pt"}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def _clip_file(encoder, path: Path) -> Path:
    config = encoder.config
    return _save(_text_model_keys(encoder.state_dict()), path,
                 {"text_encoder": {"num_attention_heads": config.num_attention_heads, "hidden_act": config.hidden_act}})


def _t5_file(encoder, path: Path) -> Path:
    # ComfyUI's T5 files keep the embedding once, as shared.weight.
    state = {k: v for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return _save(state, path, {"t5_encoder": {
        "relative_attention_max_distance": encoder.config.relative_attention_max_distance}})


def _qwen3_file(encoder, path: Path) -> Path:
    config = encoder.config
    return _save({f"model.{k}": v for k, v in encoder.state_dict().items()}, path, {"qwen3_encoder": {
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_parameters["rope_theta"]}})


def _vae_file(vae, path: Path) -> Path:
    return _save(vae_to_ldm(vae.state_dict(), vae.config), path,
                 {"vae": {"norm_num_groups": vae.config.norm_num_groups, "sample_size": vae.config.sample_size}})


def export_comfy_files(pipe, folder: str | Path, prefix: str = "") -> dict:
    """Write ``pipe`` (tiny-flux, tiny-sd3 or tiny-zimage) as ComfyUI's files under
    ``folder/models/{diffusion_models,text_encoders,vae}``; returns {"base", "text_encoders", "vae"}.
    ``prefix``: ``model.diffusion_model.`` writes the diffusion model as full checkpoints hold it."""
    folder = Path(folder)
    transformer = pipe.transformer
    config = transformer.config
    name = type(pipe).__name__
    if name == "FluxPipeline":
        state, structure = flux_to_bfl(transformer.state_dict()), {"axes_dims_rope": list(config.axes_dims_rope)}
        encoders = [_clip_file(pipe.text_encoder, folder / "models/text_encoders/clip_l.safetensors"),
                    _t5_file(pipe.text_encoder_2, folder / "models/text_encoders/t5xxl.safetensors")]
    elif name == "StableDiffusion3Pipeline":
        state, structure = sd3_to_mmdit(transformer.state_dict()), {"sample_size": config.sample_size}
        encoders = [_clip_file(pipe.text_encoder, folder / "models/text_encoders/clip_l.safetensors"),
                    _clip_file(pipe.text_encoder_2, folder / "models/text_encoders/clip_g.safetensors"),
                    _t5_file(pipe.text_encoder_3, folder / "models/text_encoders/t5xxl.safetensors")]
    elif name == "ZImagePipeline":
        state = zimage_to_nextdit(transformer.state_dict())
        structure = {"axes_dims": list(config.axes_dims), "axes_lens": list(config.axes_lens)}
        encoders = [_qwen3_file(pipe.text_encoder, folder / "models/text_encoders/qwen_3_4b.safetensors")]
    else:
        raise ValueError(f"no ComfyUI file layout for {name}")
    base = _save({prefix + k: v for k, v in state.items()}, folder / f"models/diffusion_models/{name}.safetensors",
                 {"transformer": structure})
    return {"base": base, "text_encoders": encoders, "vae": _vae_file(pipe.vae, folder / "models/vae/ae.safetensors")}
