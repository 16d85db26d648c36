"""CLIP-based scores from a local folder in the transformers layout (``CLIPModel`` + processor
files): PickScore (a CLIP fine-tuned on human preferences, Kirstain et al., 2023) — the model's
logit scale times the cosine of image and text embeddings — and the plain CLIP score."""
from __future__ import annotations

import torch

from .local import embedding, require_folder


class PickScore:
    def __init__(self, model: str | None = None, device: str = "cpu"):
        model = require_folder("pickscore", model)
        from transformers import AutoProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(model, local_files_only=True).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model, local_files_only=True)
        self.device = device

    @torch.no_grad()
    def cosines(self, images, prompts) -> torch.Tensor:
        inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        img = embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = embedding(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"]))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(-1)

    def score(self, images, prompts) -> list[float]:
        return (self.model.logit_scale.exp() * self.cosines(images, prompts)).tolist()


class ClipScore(PickScore):
    """CLIP score (Hessel et al., 2021, as commonly reported): 100 × max(cosine, 0) of the image
    and prompt embeddings of a plain CLIP model from a local folder."""

    name = "clipscore"

    def __init__(self, model: str | None = None, device: str = "cpu"):
        super().__init__(require_folder("clipscore", model), device)

    def score(self, images, prompts) -> list[float]:
        return (100.0 * self.cosines(images, prompts).clamp_min(0)).tolist()
