"""Model-based scorers load from a folder the user supplies; nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import torch


def require_folder(name: str, model) -> Path:
    """The scorer's weights folder, or an error naming the option that sets it."""
    if not model or not Path(model).is_dir():
        raise FileNotFoundError(
            f"the {name} scorer needs its weights in a local folder: pass --scorer-model {name}=FOLDER "
            f"(or model=FOLDER in Python); got {model!r}. See docs/scorers.md for the layouts.")
    return Path(model)


def find_weights(folder, patterns: tuple[str, ...]):
    """The first file in ``folder`` matching one of ``patterns``, or None."""
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def load_state_dict(path) -> dict:
    """Tensors of a .safetensors file, or of a torch file (its ``state_dict`` entry if any)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def require_complete(source, missing, unexpected) -> None:
    """Refuse weights that leave parameters at their random initialisation (a wrong folder)."""
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the model's config.json: {len(missing)} tensors missing "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {list(unexpected)[:2]})")


def embedding(out) -> torch.Tensor:
    """``get_image_features``/``get_text_features``' result as a tensor (transformers 5 may
    return an output object whose ``pooler_output`` holds it)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class LocalModelScorer:
    """A model + tokenizer from a local folder, scoring ``batch_size`` images per forward.
    Subclasses set ``name`` and ``max_tokens`` and implement ``load`` and ``forward``."""

    name = ""
    max_tokens = 77

    def __init__(self, model=None, device: str = "cpu", batch_size: int = 16):
        self.model, self.tokenizer = self.load(require_folder(self.name, model))
        self.model = self.model.to(device).eval()
        self.size = self.model.config.vision_config.image_size
        self.device, self.batch_size = device, batch_size

    def load(self, folder: Path):
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor, tokens) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images, prompts) -> list[float]:
        from .pixels import clip_pixels

        scores = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            tokens = self.tokenizer(list(prompts[start:end]), padding="max_length", truncation=True,
                                    max_length=self.max_tokens, return_tensors="pt").to(self.device)
            scores += self.forward(clip_pixels(images[start:end], self.size).to(self.device), tokens).tolist()
        return scores
