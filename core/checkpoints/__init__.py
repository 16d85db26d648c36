"""Load a base model as a diffusers pipeline, offline: tiny, diffusers folder or single file.

``load_pipeline(base)`` accepts
- ``tiny-sd15`` / ``tiny-sdxl``: the seeded tiny models of ``core.tiny_models``;
- a diffusers folder (``model_index.json``), loaded with ``local_files_only``;
- a ComfyUI / A1111 single-file ``.safetensors`` checkpoint in the original layout, SD1.5 or
  SDXL, converted with the configs the pack ships (``core/configs``) and widths read from the
  tensors;
- a ComfyUI Flux.1 / SD3.5 / Z-Image diffusion model with its text encoder and VAE files
  (``dit_files.py``). Nothing here reaches a network.

Tokenizers never come from a hub: text encoders with the tiny vocabulary get the tiny tokenizer;
real ones need the tokenizer files on disk (``tokenizers.py``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import convert as cc
from .components import build, clip_text_encoder, read_file
from .tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer, find_clip_tokenizer
from ..tiny_models import TINY_BASES, build_tiny_pipeline

ARCHITECTURES = ("sd15", "sdxl")
DIT_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline", "ZImagePipeline")
__all__ = ["ARCHITECTURES", "CLIP_VOCAB_SIZE", "architecture", "clip_tokenizer", "dit_file_family",
           "find_clip_tokenizer", "load_diffusers_folder", "load_pipeline", "load_single_file"]


def architecture(state_dict_keys) -> str:
    """``"sd15"`` or ``"sdxl"`` from the key names of an original-layout checkpoint."""
    keys = set(state_dict_keys)
    has_unet = any(k.startswith(cc.UNET_PREFIX) for k in keys)
    has_vae = any(k.startswith(cc.VAE_PREFIX) for k in keys)
    clip_l = any(k.startswith((cc.SD15_CLIP_PREFIX, cc.SDXL_CLIP_L_PREFIX)) for k in keys)
    clip_g = any(k.startswith(cc.SDXL_CLIP_G_PREFIX) for k in keys)
    label_emb = cc.UNET_PREFIX + "label_emb.0.0.weight" in keys
    if has_unet and has_vae:
        if clip_g and label_emb and any(k.startswith(cc.SDXL_CLIP_L_PREFIX) for k in keys):
            return "sdxl"
        if any(k.startswith(cc.SD15_CLIP_PREFIX) for k in keys) and not label_emb:
            return "sd15"
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            raise ValueError("this is an SD2.x checkpoint (OpenCLIP text encoder); only SD1.5 and SDXL are supported")
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            raise ValueError("this is an SDXL refiner checkpoint; only SD1.5 and SDXL base models are supported")
    found = [name for name, present in (
        ("UNet " + cc.UNET_PREFIX, has_unet), ("VAE " + cc.VAE_PREFIX, has_vae),
        ("CLIP-L text encoder", clip_l), ("OpenCLIP-G text encoder", clip_g),
    ) if present]
    sample = sorted(keys)[:3]
    raise ValueError(
        "unrecognised checkpoint layout: expected a Flux.1, SD3.5 or Z-Image diffusion model, or an SD1.5 or SDXL "
        "single-file checkpoint with "
        f"{cc.UNET_PREFIX}*, {cc.VAE_PREFIX}* and {cc.SD15_CLIP_PREFIX}* (SD1.5) or "
        f"conditioner.embedders.0/1.* (SDXL); found {', '.join(found) or 'none of them'} "
        f"({len(keys)} keys, e.g. {sample})"
    )


# ---- single-file checkpoints -----------------------------------------------------------------
def load_single_file(path: str | os.PathLike, *, dtype=torch.float32, tokenizer=None):
    """An SD1.5 / SDXL diffusers pipeline from an original-layout ``.safetensors`` file."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    checkpoint, metadata = read_file(path)
    arch = architecture(checkpoint)
    structure = cc.parse_structure(metadata)

    def clip(state, base, component, cls, tok):
        return clip_text_encoder(state, base, component, cls, tok, structure, dtype, f"{path.name} {component}")

    def vocab_size(state) -> int:
        return int(state["text_model.embeddings.token_embedding.weight"].shape[0])

    if arch == "sd15":
        te_state = cc.convert_clip_l(cc.drop_ignored(checkpoint))
        tokenizers = {"tokenizer": clip_tokenizer(vocab_size(te_state), tokenizer=tokenizer, checkpoint=path)}
        text_encoders = {"text_encoder": clip(te_state, "clip_l_text_encoder", "text_encoder",
                                              CLIPTextModel, tokenizers["tokenizer"])}
    else:
        te_state = cc.convert_clip_l({k: v for k, v in checkpoint.items() if k.startswith(cc.SDXL_CLIP_L_PREFIX)})
        te2_state = cc.convert_clip_g({k: v for k, v in checkpoint.items() if k.startswith(cc.SDXL_CLIP_G_PREFIX)})
        tokenizers = {
            "tokenizer": clip_tokenizer(vocab_size(te_state), tokenizer=tokenizer, checkpoint=path),
            # SDXL's second tokenizer is the same BPE, padded with "!" instead of <|endoftext|>.
            "tokenizer_2": clip_tokenizer(vocab_size(te2_state), pad_token="!", tokenizer=tokenizer,
                                          checkpoint=path),
        }
        text_encoders = {
            "text_encoder": clip(te_state, "clip_l_text_encoder", "text_encoder", CLIPTextModel,
                                 tokenizers["tokenizer"]),
            "text_encoder_2": clip(te2_state, "clip_bigg_text_encoder", "text_encoder_2",
                                   CLIPTextModelWithProjection, tokenizers["tokenizer_2"]),
        }

    unet_ldm = {k: v for k, v in checkpoint.items() if k.startswith(cc.UNET_PREFIX)}
    unet_config = cc.unet_config(cc.strip_prefix(unet_ldm, cc.UNET_PREFIX), arch, structure)
    if arch == "sdxl":
        cc.set_sdxl_time_embedding(unet_config, text_encoders["text_encoder_2"].config.projection_dim)
    unet = build(lambda: UNet2DConditionModel(**unet_config), cc.convert_unet(unet_ldm, unet_config),
                  dtype, f"{path.name} UNet")

    vae_ldm = {k: v for k, v in checkpoint.items() if k.startswith(cc.VAE_PREFIX)}
    vae_config = cc.vae_config(cc.strip_prefix(vae_ldm, cc.VAE_PREFIX), arch, structure)
    # Dtype policy: every component in `dtype`; the VAE config keeps force_upcast, so diffusers'
    # pipelines decode in fp32 (SD VAEs overflow in fp16).
    vae = build(lambda: AutoencoderKL(**vae_config), cc.convert_vae(vae_ldm, vae_config), dtype, f"{path.name} VAE")
    scheduler_config = cc.shipped_config(f"{arch}_scheduler")
    if "v_pred" in checkpoint:  # the marker key ComfyUI also reads for v-prediction SD models
        scheduler_config["prediction_type"] = "v_prediction"
    del checkpoint, unet_ldm, vae_ldm
    if arch == "sd15":
        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, scheduler=DDIMScheduler(**scheduler_config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, **text_encoders, **tokenizers,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            unet=unet, vae=vae, scheduler=EulerDiscreteScheduler(**scheduler_config),
            **text_encoders, **tokenizers,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- diffusers folders -----------------------------------------------------------------------
def load_diffusers_folder(path: str | os.PathLike, *, dtype=torch.float32):
    import diffusers

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    name = index.get("_class_name", "")
    if name in DIT_PIPELINES:
        cls, extra = getattr(diffusers, name), {}
    elif "XL" in name:
        cls, extra = diffusers.StableDiffusionXLPipeline, {}
    elif name.startswith("StableDiffusion"):
        # No safety checker: it is not part of what is trained and costs 1.2 GB.
        cls, extra = diffusers.StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}
    else:
        raise ValueError(f"{path}: pipeline class {name!r} is not an SD1.5, SDXL, {', '.join(DIT_PIPELINES)} pipeline")
    pipe = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_file_family(base: str) -> str | None:
    """``flux``, ``sd3`` or ``zimage`` for a ComfyUI diffusion-transformer ``.safetensors`` file
    (read from its header alone), None for any other base."""
    path = Path(base).expanduser()
    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    from .components import read_shapes
    from .dit_convert import dit_family

    return dit_family(read_shapes(path)[0])


def load_pipeline(base: str, *, dtype: torch.dtype = torch.float32, tokenizer=None, text_encoders=(), vae=None):
    """A diffusers pipeline for ``base``: a tiny base (``TINY_BASES``), a diffusers folder, an
    original-layout single-file SD1.5 / SDXL checkpoint, or a ComfyUI Flux.1 / SD3.5 / Z-Image
    diffusion model with its ``text_encoders`` and ``vae`` files (``dit_files.py``). ``tokenizer``:
    a folder with CLIP's vocab.json + merges.txt, for files with the real CLIP vocabulary."""
    text_encoders = [str(p) for p in text_encoders or ()]
    path = Path(base).expanduser()
    family = dit_file_family(base)
    if (text_encoders or vae) and family is None:
        raise ValueError(f"--text-encoders / --vae go with a Flux.1, SD3.5 or Z-Image diffusion model file; "
                         f"base {base!r} brings its own")
    if family is not None:
        from .dit_files import load_dit_files

        return load_dit_files(path, family, dtype=dtype, tokenizer=tokenizer, text_encoders=text_encoders, vae=vae)
    if base in TINY_BASES:
        pipe = build_tiny_pipeline(base)
        return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return load_diffusers_folder(path, dtype=dtype)
        raise ValueError(f"{path} is a folder without model_index.json; expected a diffusers pipeline folder")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{path}: only .safetensors checkpoints are loaded (pickled .ckpt/.pt files can run code)"
            )
        return load_single_file(path, dtype=dtype, tokenizer=tokenizer)
    raise FileNotFoundError(
        f"base {base!r} is neither {' / '.join(TINY_BASES)}, a diffusers folder nor an existing .safetensors file"
    )
