"""ImageReward (Xu et al., 2023): BLIP's ViT-L image encoder, a BERT text encoder that
cross-attends to the image, and an MLP on the [CLS] feature, standardized with the mean and std
published with the model. Prompts are tokenized to 35 tokens, images preprocessed as CLIP's.

A local folder in one of two layouts (nothing is downloaded), each with BERT's ``vocab.txt``:
- this pack's: ``config.json`` (a transformers ``BlipConfig``: vision_config, text_config) and
  ``model.safetensors`` with ``vision.*`` (``BlipVisionModel``), ``text.*`` (``BlipTextModel``
  without pooler) and ``head.layers.*`` tensors — what ``save_image_reward`` writes;
- the official ``ImageReward.pt`` beside that ``config.json``: its ``blip.visual_encoder.*``
  (timm-style ViT), ``blip.text_encoder.*`` and ``mlp.layers.*`` tensors are renamed on load
  (``official_to_pack``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .local import LocalModelScorer, find_weights, load_state_dict, require_complete

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35


class RewardHead(nn.Module):
    """768 → 1024 → 128 → 64 → 16 → 1, with the dropouts (inactive in eval) at the original
    indices so the official ``mlp.layers.N`` tensors map one to one."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.config = config
        self.vision = BlipVisionModel(config.vision_config)
        self.text = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.head = RewardHead(config.text_config.hidden_size)

    def forward(self, pixels, input_ids, attention_mask) -> torch.Tensor:
        image = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                         encoder_attention_mask=image_mask).last_hidden_state
        return ((self.head(text[:, 0].float()) - MEAN) / STD).squeeze(-1)


_VISION = [(r"^cls_token$", "embeddings.class_embedding"), (r"^pos_embed$", "embeddings.position_embedding"),
           (r"^patch_embed\.proj\.", "embeddings.patch_embedding."), (r"^norm\.", "post_layernorm."),
           (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
           (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
           (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
           (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
           (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp.")]


def official_to_pack(state: dict) -> dict:
    """The official checkpoint's tensors in this pack's naming; BLIP parts ImageReward does not
    use for scoring (projections, queues, the decoder) are dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("mlp.layers."):
            out["head." + key[len("mlp."):]] = value
        elif key.startswith("blip.text_encoder."):
            out["text." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            for pattern, repl in _VISION:
                renamed, count = re.subn(pattern, repl, name)
                if count:
                    out["vision." + renamed] = value
                    break
            else:
                raise KeyError(f"unknown ImageReward vision key {key!r}")
    return out


def save_image_reward(model: ImageRewardModel, folder) -> None:
    """Write ``model`` in this pack's layout (tokenizer files are the caller's)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, default=str))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def load_image_reward(folder) -> ImageRewardModel:
    from transformers import BlipConfig

    folder = Path(folder)
    weights = find_weights(folder, ("model.safetensors", "ImageReward*.pt", "*.pt"))
    if weights is None or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} needs config.json (a BlipConfig) and model.safetensors or ImageReward.pt; "
                                "see docs/scorers.md")
    model = ImageRewardModel(BlipConfig.from_pretrained(folder, local_files_only=True))
    state = load_state_dict(weights)
    if not weights.name.endswith(".safetensors"):
        state = official_to_pack(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    require_complete(weights, missing, unexpected)
    return model


class ImageReward(LocalModelScorer):
    name = "imagereward"
    max_tokens = MAX_TOKENS

    def load(self, folder: Path):
        from transformers import BertTokenizer

        return load_image_reward(folder), BertTokenizer.from_pretrained(folder, local_files_only=True)

    def forward(self, pixels, tokens) -> torch.Tensor:
        return self.model(pixels, tokens.input_ids, tokens.attention_mask)
