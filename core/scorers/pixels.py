"""The image preprocessing CLIP-family scorers were trained with: shorter side resized to the
input size (bicubic), centre crop, scaled to [0, 1], normalized with OpenAI CLIP's mean and std.
HPS v2 (open_clip's ViT-H-14) and ImageReward (BLIP) both use it."""
from __future__ import annotations

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images, size: int) -> torch.Tensor:
    """(B, 3, size, size) float32 from PIL images or HxWx3 uint8 arrays."""
    from PIL import Image

    out = []
    for image in images:
        im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        im = im.convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std
