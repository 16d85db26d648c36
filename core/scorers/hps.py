"""HPS v2 / v2.1 (Wu et al., 2023): an open_clip ViT-H-14 fine-tuned on human preference
choices. The score is the cosine of the normalized image and text embeddings (about 0.2-0.35
for ordinary images); no logit scale.

A local folder in one of two layouts (nothing is downloaded):
- transformers: what ``CLIPModel.save_pretrained`` writes (``config.json`` + weights), plus the
  CLIP tokenizer's ``vocab.json`` and ``merges.txt``;
- the official open_clip checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``,
  any ``*.pt``) beside a ``config.json`` describing ViT-H-14 as a ``CLIPConfig`` (the one of
  laion's CLIP-ViT-H-14 transformers port fits) and the tokenizer files; the weights are
  converted to the transformers layout when loaded (``open_clip_to_transformers``).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .local import LocalModelScorer, embedding, find_weights, load_state_dict, require_complete

TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_WEIGHTS = ("*.pt", "*.pth", "open_clip*.safetensors")

# open_clip residual block -> transformers CLIP encoder layer (q, k, v come from in_proj)
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)$")


def open_clip_to_transformers(state: dict) -> dict:
    """An open_clip CLIP state dict in transformers ``CLIPModel`` naming. Raises on a key it
    does not know, so a checkpoint of another architecture fails loudly."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in _TOP:
            out[_TOP[key]] = value
        elif key == "text_projection":  # open_clip: x @ P; transformers: Linear, weight = Pᵀ
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "attn_mask":
            continue  # the causal mask, rebuilt by transformers
        elif m := _RESBLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            layer, module, kind = m.group(2), m.group(3), m.group(4)
            prefix = f"{tower}.encoder.layers.{layer}"
            if module == "attn" and kind in ("in_proj_weight", "in_proj_bias"):
                suffix = "weight" if kind == "in_proj_weight" else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}.self_attn.{name}.{suffix}"] = part.contiguous()
            elif module in _BLOCK:
                out[f"{prefix}.{_BLOCK[module]}.{kind}"] = value
            else:
                raise KeyError(f"unknown open_clip key {key!r}")
        else:
            raise KeyError(f"unknown open_clip key {key!r}")
    return out


def load_clip(folder) -> "torch.nn.Module":
    """A ``CLIPModel`` from a transformers folder or an open_clip checkpoint + config.json."""
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    if find_weights(folder, TRANSFORMERS_WEIGHTS) and _model_type(folder) == "clip":
        model, info = CLIPModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
        require_complete(folder, info["missing_keys"], info["unexpected_keys"])
        return model
    checkpoint = find_weights(folder, OPEN_CLIP_WEIGHTS)
    if checkpoint is None or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} holds neither transformers CLIP weights ({', '.join(TRANSFORMERS_WEIGHTS)} + config.json) "
            "nor an open_clip checkpoint (*.pt) with a CLIPConfig config.json beside it")
    model = CLIPModel(CLIPConfig.from_pretrained(folder, local_files_only=True))
    missing, unexpected = model.load_state_dict(open_clip_to_transformers(load_state_dict(checkpoint)), strict=False)
    require_complete(checkpoint, missing, unexpected)
    return model


def _model_type(folder: Path) -> str | None:
    import json

    path = folder / "config.json"
    return json.loads(path.read_text()).get("model_type") if path.is_file() else None


class HPSv2(LocalModelScorer):
    name = "hps"

    def load(self, folder: Path):
        from transformers import CLIPTokenizer

        return load_clip(folder), CLIPTokenizer.from_pretrained(folder, local_files_only=True)

    def forward(self, pixels, tokens) -> torch.Tensor:
        img = embedding(self.model.get_image_features(pixel_values=pixels))
        txt = embedding(self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
        return (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
