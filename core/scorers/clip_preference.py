"""PickScore: a CLIP model fine-tuned on human preferences (Kirstain et al., 2023), loaded from
a local folder in the transformers layout (``CLIPModel`` + processor files). The score is the
model's logit scale times the cosine of image and text embeddings."""
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
    def score(self, images, prompts) -> list[float]:
        inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        img = embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = embedding(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"]))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return (self.model.logit_scale.exp() * (img * txt).sum(-1)).tolist()
