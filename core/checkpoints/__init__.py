"""Load a base model as a diffusers pipeline, offline: tiny, diffusers folder or single file.

``load_pipeline(base)`` accepts
- ``tiny-sd15`` / ``tiny-sdxl``: the seeded tiny models of ``core.tiny_models``;
- a diffusers folder (``model_index.json``), loaded with ``local_files_only``;
- a ComfyUI / A1111 single-file ``.safetensors`` checkpoint in the original layout, SD1.5 or
  SDXL, converted with the configs the pack ships (``core/configs``) and widths read from the
  tensors. Nothing here reaches a network.

Tokenizers never come from a hub: text encoders with the tiny vocabulary get the tiny tokenizer;
real 49408-token CLIP encoders need a CLIP BPE vocabulary on disk (see ``find_clip_tokenizer``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import convert as cc
from ..tiny_models import TINY_BASES, build_tiny_pipeline
from ..tiny_tokenizer import tiny_clip_tokenizer, vocabulary

ARCHITECTURES = ("sd15", "sdxl")
CLIP_VOCAB_SIZE = 49408


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
        "unrecognised checkpoint layout: expected an SD1.5 or SDXL single-file checkpoint with "
        f"{cc.UNET_PREFIX}*, {cc.VAE_PREFIX}* and {cc.SD15_CLIP_PREFIX}* (SD1.5) or "
        f"conditioner.embedders.0/1.* (SDXL); found {', '.join(found) or 'none of them'} "
        f"({len(keys)} keys, e.g. {sample})"
    )


# ---- tokenizers ------------------------------------------------------------------------------
def _bpe_folder(path: Path) -> Path | None:
    for folder in (path, path / "tokenizer"):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
    return None


def _comfyui_trees(checkpoint: Path | None) -> list[Path]:
    trees = []
    if os.environ.get("COMFYUI_PATH"):
        trees.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if checkpoint is not None:
        # <tree>/models/checkpoints/[sub/]file.safetensors
        for parent in checkpoint.resolve().parents:
            if parent.name == "models" and (parent.parent / "comfy").is_dir():
                trees.append(parent.parent)
                break
    return trees


def find_clip_tokenizer(tokenizer: str | os.PathLike | None = None, checkpoint=None) -> Path:
    """Folder holding CLIP's BPE ``vocab.json`` + ``merges.txt``, searched in order: the
    ``tokenizer`` argument (the folder, or a diffusers folder with ``tokenizer/``), then ComfyUI's
    ``comfy/sd1_tokenizer`` in the tree named by ``COMFYUI_PATH`` or holding the checkpoint."""
    searched = []
    if tokenizer is not None:
        folder = _bpe_folder(Path(tokenizer).expanduser())
        if folder is None:
            raise FileNotFoundError(f"tokenizer folder {tokenizer} has no vocab.json and merges.txt")
        return folder
    for tree in _comfyui_trees(Path(checkpoint) if checkpoint else None):
        candidate = tree / "comfy" / "sd1_tokenizer"
        searched.append(str(candidate))
        if _bpe_folder(candidate):
            return candidate
    raise FileNotFoundError(
        "this checkpoint's text encoder uses the real CLIP vocabulary (49408 tokens) and no CLIP "
        "tokenizer was found offline. Pass a folder with CLIP's vocab.json and merges.txt "
        "(--tokenizer, e.g. <ComfyUI>/comfy/sd1_tokenizer or a diffusers model's tokenizer/), "
        "or set COMFYUI_PATH to a ComfyUI tree"
        + (f" (searched: {', '.join(searched)})" if searched else "")
    )


def clip_tokenizer(vocab_size: int, *, pad_token: str | None = None, tokenizer=None, checkpoint=None):
    """The tokenizer matching a text encoder's vocabulary size, without a hub."""
    if vocab_size == len(vocabulary()[0]):
        return tiny_clip_tokenizer()  # pads with <|endoftext|>; tiny SDXL uses it for both
    if vocab_size != CLIP_VOCAB_SIZE:
        raise ValueError(f"text encoder has a {vocab_size}-token vocabulary; expected CLIP's {CLIP_VOCAB_SIZE}")
    from transformers import CLIPTokenizer

    folder = find_clip_tokenizer(tokenizer, checkpoint)
    kwargs = {"pad_token": pad_token} if pad_token else {}
    # ComfyUI's copy declares model_max_length 8192; SD's text encoders take 77 positions.
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77, **kwargs)


# ---- single-file checkpoints -----------------------------------------------------------------
def _read(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {k: handle.get_tensor(k) for k in handle.keys()}, metadata
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None


def _build(factory, state: dict, dtype, what: str):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = factory()
    return cc.load_into(model, cc.drop_ignored(state), dtype, what)


def load_single_file(path: str | os.PathLike, *, dtype=torch.float32, tokenizer=None):
    """An SD1.5 / SDXL diffusers pipeline from an original-layout ``.safetensors`` file."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    checkpoint, metadata = _read(path)
    arch = architecture(checkpoint)
    structure = cc.parse_structure(metadata)

    def clip(state, base, component, cls, tok):
        config = cc.clip_config(state, base, component, structure)
        # Token ids from the tokenizer: the text tower pools at the first end-of-text token.
        config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
        if cls is CLIPTextModel:  # flattened in transformers >= 5.6: no text_model level
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        model = _build(lambda: cls(CLIPTextConfig(**config)), state, dtype, f"{path.name} {component}")
        return model

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
    unet = _build(lambda: UNet2DConditionModel(**unet_config), cc.convert_unet(unet_ldm, unet_config),
                  dtype, f"{path.name} UNet")

    vae_ldm = {k: v for k, v in checkpoint.items() if k.startswith(cc.VAE_PREFIX)}
    vae_config = cc.vae_config(cc.strip_prefix(vae_ldm, cc.VAE_PREFIX), arch, structure)
    # Dtype policy: every component in `dtype`; the VAE config keeps force_upcast, so diffusers'
    # pipelines decode in fp32 (SD VAEs overflow in fp16).
    vae = _build(lambda: AutoencoderKL(**vae_config), cc.convert_vae(vae_ldm, vae_config), dtype, f"{path.name} VAE")
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
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    name = index.get("_class_name", "")
    if "XL" in name:
        pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    elif name.startswith("StableDiffusion"):
        # No safety checker: it is not part of what is trained and costs 1.2 GB.
        pipe = StableDiffusionPipeline.from_pretrained(
            path, torch_dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    else:
        raise ValueError(f"{path}: pipeline class {name!r} is not an SD1.5 or SDXL pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(base: str, *, dtype: torch.dtype = torch.float32, tokenizer=None):
    """A diffusers pipeline for ``base``: ``tiny-sd15`` / ``tiny-sdxl``, a diffusers folder, or
    an original-layout single-file ``.safetensors`` checkpoint (SD1.5 or SDXL). ``tokenizer``: a
    folder with CLIP's vocab.json + merges.txt, for single files with the real CLIP vocabulary."""
    if base in TINY_BASES:
        pipe = build_tiny_pipeline(base)
        return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe
    path = Path(base).expanduser()
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
