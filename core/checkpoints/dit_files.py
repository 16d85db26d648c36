"""Flux.1, SD3.5 and Z-Image pipelines from ComfyUI's separate model files, offline.

ComfyUI keeps these families in pieces: the diffusion model (``models/diffusion_models``, or a full
checkpoint in ``models/checkpoints`` such as Stability's sd3.5_*.safetensors with its text encoders
and VAE inside), the text encoders (``models/text_encoders`` or ``models/clip``: what its
DualCLIPLoader / TripleCLIPLoader / CLIPLoader take) and the VAE (``models/vae``). Which file is
which is read from its keys and shapes, never from its name or position, and everything a family
needs is checked from the files' headers before any tensor is read.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .convert import VAE_PREFIX, convert_vae, drop_ignored, parse_structure, shipped_config, strip_prefix, vae_config
from .dit_convert import (CONVERTERS, FAMILY_NAMES, SD3_BUNDLED, clip_width, convert_qwen3, convert_t5, encoder_kind,
                          qwen3_config, strip_diffusion_prefix, t5_config)
from .components import build, clip_text_encoder, read_file, read_shapes
from .tokenizers import clip_tokenizer, qwen_tokenizer, t5_tokenizer

# The text encoders each family's diffusers pipeline takes, in its order.
ENCODER_ROLES = {"flux": ("clip_l", "t5"), "sd3": ("clip_l", "clip_g", "t5"), "zimage": ("qwen3",)}
ROLE_FILES = {"clip_l": "CLIP-L (clip_l.safetensors)", "clip_g": "CLIP-G (clip_g.safetensors)",
              "t5": "T5-XXL (t5xxl_fp16.safetensors)", "qwen3": "Qwen3-4B (qwen_3_4b.safetensors)"}
VAE_FILES = {"flux": "ae.safetensors", "sd3": "SD3.5's VAE (e.g. sd3.5_vae.safetensors)",
             "zimage": "Flux's ae.safetensors"}
VAE_FORMAT = {"flux": "flux", "sd3": "sd3", "zimage": "flux"}  # shipped VAE config: latent scaling and shift
VAE_PREFIXES = (VAE_PREFIX, "vae.")  # inside a full checkpoint; a VAE file is bare


@dataclass
class Part:
    """Where one component's tensors are: a file and the key prefix inside it."""

    path: Path
    prefix: str = ""
    structure: dict = field(default_factory=dict)


@dataclass
class Plan:
    family: str
    transformer: Part
    encoders: dict  # role -> Part
    vae: Part | None


def _vae_prefix(shapes) -> str | None:
    for prefix in ("",) + VAE_PREFIXES:
        if prefix + "decoder.conv_in.weight" in shapes:
            return prefix
    return None


def _clip_role(family: str, width: int, pooled_dim: int) -> str:
    """Flux takes one CLIP (L); SD3's pooled input is CLIP-L's and CLIP-G's embeddings side by side,
    CLIP-L the narrower (768 of 2048)."""
    if family == "flux":
        return "clip_l"
    return "clip_l" if 2 * width < pooled_dim else "clip_g"


def plan(base: Path, base_shapes: dict, base_metadata: dict, family: str, text_encoders=(), vae=None) -> Plan:
    """Every part the family needs, from headers only; one refusal naming everything missing."""
    name = FAMILY_NAMES[family]
    roles = ENCODER_ROLES[family]
    encoders: dict[str, Part] = {}
    structure = parse_structure(base_metadata)  # the bundled parts' too
    if family == "sd3":  # Stability's full checkpoints hold the three encoders and the VAE
        for role, prefix in SD3_BUNDLED.items():
            if any(k.startswith(prefix) for k in base_shapes):
                encoders[role] = Part(base, prefix, structure)
    vae_part = None
    bundled_vae = _vae_prefix(base_shapes)
    if bundled_vae:
        vae_part = Part(base, bundled_vae, structure)
    pooled_dim = 0
    if family == "sd3":
        pooled_dim = strip_diffusion_prefix(base_shapes)["y_embedder.mlp.0.weight"][1]

    given = {}
    for path in text_encoders:
        path = Path(path).expanduser()
        shapes, metadata = read_shapes(path)
        kind = encoder_kind(shapes)
        if kind is None:
            raise ValueError(f"{path.name} is not a text encoder ComfyUI's CLIP loaders take (CLIP-L, CLIP-G, "
                             f"T5-XXL or Qwen3, transformers' key layout); {name} uses "
                             + ", ".join(ROLE_FILES[r] for r in roles))
        role = _clip_role(family, clip_width(shapes), pooled_dim) if kind == "clip" else kind
        if role not in roles:
            raise ValueError(f"{path.name} is a {ROLE_FILES[role].split(' ')[0]} text encoder, which {name} does not "
                             f"use; {name} uses " + ", ".join(ROLE_FILES[r] for r in roles))
        if role in given:
            raise ValueError(f"{given[role].name} and {path.name} are both {ROLE_FILES[role].split(' ')[0]} "
                             "text encoders; give one")
        given[role] = path
        encoders[role] = Part(path, "", parse_structure(metadata))  # a given file wins over a bundled one
    if vae is not None:
        path = Path(vae).expanduser()
        shapes, metadata = read_shapes(path)
        prefix = _vae_prefix(shapes)
        if prefix is None:
            raise ValueError(f"{path.name} is not a VAE in ComfyUI's (LDM) layout: no decoder.conv_in.weight")
        vae_part = Part(path, prefix, parse_structure(metadata))

    missing = [ROLE_FILES[r] for r in roles if r not in encoders]
    if missing or vae_part is None:
        needs = []
        if missing:
            needs.append(f"its text encoder{'s' if len(missing) > 1 else ''} {' and '.join(missing)}, which ComfyUI "
                         "keeps in models/text_encoders (or models/clip): pass --text-encoders FILE ...")
        if vae_part is None:
            needs.append(f"its VAE {VAE_FILES[family]}, which ComfyUI keeps in models/vae: pass --vae FILE")
        raise ValueError(f"{base.name} is a {name} diffusion model without everything it needs; {name} also needs "
                         + "; and ".join(needs))
    return Plan(family, Part(base, "", structure), encoders, vae_part)


class _Files:
    """Each file read once (an SD3.5 checkpoint serves several parts) and let go after its last
    part, so Flux.1-dev's 24 GB file is not held in memory while T5-XXL loads."""

    def __init__(self, parts):
        self._cache = {}
        self._uses = Counter(part.path for part in parts)

    def state(self, part: Part) -> dict:
        tensors = self._cache.pop(part.path, None)
        if tensors is None:
            tensors = read_file(part.path)[0]
        self._uses[part.path] -= 1
        if self._uses[part.path] > 0:
            self._cache[part.path] = tensors
        return strip_prefix(tensors, part.prefix) if part.prefix else tensors


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _text_encoder(family: str, role: str, state: dict, part: Part, tok, dtype):
    from transformers import (CLIPTextModel, CLIPTextModelWithProjection, Qwen3Config, Qwen3Model, T5Config,
                              T5EncoderModel)

    what = f"{part.path.name} {ROLE_FILES[role].split(' ')[0]}"
    if role in ("clip_l", "clip_g"):
        cls = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel  # SD3 pools projected embeddings
        base = "clip_l_text_encoder" if role == "clip_l" else "clip_bigg_text_encoder"
        return clip_text_encoder(state, base, "text_encoder", cls, tok, part.structure, dtype, what)
    shapes = _shapes(state)
    if role == "t5":
        return build(lambda: T5EncoderModel(T5Config(**t5_config(shapes, part.structure))), convert_t5(state),
                     dtype, what)
    config = {**qwen3_config(shapes, part.structure), "pad_token_id": tok.pad_token_id}
    return build(lambda: Qwen3Model(Qwen3Config(**config)), convert_qwen3(state), dtype, what)


def _with_identity_projection(state: dict) -> dict:
    """SD3 takes CLIP-L's projected pooled embedding; a clip_l file without text_projection is used
    with the identity, as ComfyUI does."""
    import torch

    if "text_projection.weight" in state:
        return state
    width = state["text_model.embeddings.token_embedding.weight"].shape[1]
    return {**state, "text_projection.weight": torch.eye(width, dtype=state["text_model.final_layer_norm.weight"].dtype)}


def load(plan_: Plan, *, dtype, tokenizer=None):
    """The family's diffusers pipeline from the planned parts."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline, ZImagePipeline, ZImageTransformer2DModel)

    family = plan_.family
    files = _Files([plan_.transformer, *plan_.encoders.values(), plan_.vae])
    hints = [plan_.transformer.path, *(p.path for p in plan_.encoders.values()), plan_.vae.path, tokenizer]

    state = strip_diffusion_prefix(files.state(plan_.transformer))
    config_of, convert = CONVERTERS[family]
    config = config_of(_shapes(state), plan_.transformer.structure)
    cls = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel, "zimage": ZImageTransformer2DModel}[family]
    transformer = build(lambda: cls(**config), convert(state), dtype, f"{plan_.transformer.path.name} transformer")
    del state

    components = {}
    for index, role in enumerate(ENCODER_ROLES[family]):
        suffix = f"_{index + 1}" if index else ""
        part = plan_.encoders[role]
        state = drop_ignored(files.state(part))
        if role == "clip_l" and family == "sd3":
            state = _with_identity_projection(state)
        vocab = next(v.shape[0] for k, v in state.items()
                     if k.endswith(("token_embedding.weight", "shared.weight", "embed_tokens.weight")))
        if role.startswith("clip"):
            # SDXL's and SD3's second CLIP tokenizer pads with "!" (ComfyUI: pad_with_end=False).
            tok = clip_tokenizer(vocab, pad_token="!" if role == "clip_g" else None, tokenizer=tokenizer,
                                 checkpoint=hints)
        elif role == "t5":
            tok = t5_tokenizer(vocab, hints)
        else:
            tok = qwen_tokenizer(vocab, hints)
        components[f"tokenizer{suffix}"] = tok
        components[f"text_encoder{suffix}"] = _text_encoder(family, role, state, part, tok, dtype)

    vae_state = files.state(plan_.vae)
    vae_settings = vae_config(vae_state, VAE_FORMAT[family], plan_.vae.structure)
    # the VAE in fp32 whatever ``dtype`` (the pack's dtype policy: VAEs overflow in half precision)
    vae = build(lambda: AutoencoderKL(**vae_settings), convert_vae(vae_state, vae_settings), torch.float32,
                f"{plan_.vae.path.name} VAE")
    schedule = {"flux": "flux_dev_scheduler" if config.get("guidance_embeds") else "flux_schnell_scheduler",
                "sd3": "sd3_scheduler", "zimage": "zimage_scheduler"}[family]
    scheduler = FlowMatchEulerDiscreteScheduler(**shipped_config(schedule))
    pipeline = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline, "zimage": ZImagePipeline}[family]
    pipe = pipeline(transformer=transformer, vae=vae, scheduler=scheduler, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_dit_files(base: Path, family: str, *, dtype, tokenizer=None, text_encoders=(), vae=None):
    shapes, metadata = read_shapes(base)
    return load(plan(base, shapes, metadata, family, text_encoders, vae), dtype=dtype, tokenizer=tokenizer)
