"""Synthetic scenes for ``bench fairness``: a smooth background with one small "face" and one
smaller "hand" patch of fine texture, and their exact masks.

Why synthetic, not the sample photos: at the few pixels a face or hand covers in a tiny model's
training image, a photo's regions hold the same low-frequency statistics as the rest, and a
tiny denoiser learns those first everywhere at once — no weighting can starve or favour a region
(the earlier photo bench found every weighting within about two points). Here the regions carry
what real faces and hands carry and the global loss barely rewards: detail finer than anything
else in the image, on a small share of the pixels (face 6×6 = 6 %, hand 4×4 = 3 % of a 24×24
scene). The background is smooth, so a denoiser that serves the global loss learns "fine
structure is noise" — exactly wrong inside the patches. Masks are exact, so no detector's error
enters the measurement.

Textures (random colours and phase per patch, so a model must read them from the noisy input):
face = stripes one pixel wide, horizontal or vertical; hand = a one-pixel checkerboard.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE = 24  # scene side in pixels
FACE, HAND = 6, 4  # patch sides in pixels


def _patch_colours(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two contrasting colours per patch, (n, 3, 1, 1) each, in [-1, 1]."""
    base = torch.rand(n, 3, 1, 1, generator=generator) * 1.2 - 0.6
    contrast = (torch.rand(n, 3, 1, 1, generator=generator) * 0.5 + 0.3) * torch.where(
        torch.rand(n, 3, 1, 1, generator=generator) < 0.5, -1.0, 1.0)
    return (base + contrast).clamp(-1, 1), (base - contrast).clamp(-1, 1)


def _place(canvas: torch.Tensor, mask: torch.Tensor, texture: torch.Tensor, generator: torch.Generator,
           taken: torch.Tensor | None = None) -> None:
    """Paste each (3, s, s) texture at a random spot (not overlapping ``taken``), marking ``mask``."""
    n, side, size = texture.shape[0], texture.shape[-1], canvas.shape[-1]
    for i in range(n):
        while True:
            y, x = torch.randint(0, size - side + 1, (2,), generator=generator).tolist()
            if taken is None or not taken[i, 0, y: y + side, x: x + side].any():
                break
        canvas[i, :, y: y + side, x: x + side] = texture[i]
        mask[i, 0, y: y + side, x: x + side] = 1.0


def draw_scenes(generator: torch.Generator, n: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` scenes: (images (n, 3, size, size) in [-1, 1], face masks (n, 1, size, size),
    hand masks (n, 1, size, size)), a pure function of the generator's state."""
    coarse = torch.randn(n, 3, 3, 3, generator=generator) * 0.35
    images = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    face_mask, hand_mask = torch.zeros(n, 1, size, size), torch.zeros(n, 1, size, size)

    rows = torch.arange(FACE).view(FACE, 1).expand(FACE, FACE)
    phase = torch.randint(0, 2, (n, 1, 1, 1), generator=generator)
    vertical = torch.rand(n, 1, 1, 1, generator=generator) < 0.5
    stripes = (torch.where(vertical, rows.T, rows) + phase) % 2  # (n, 1, FACE, FACE)
    a, b = _patch_colours(generator, n)
    _place(images, face_mask, torch.where(stripes.bool(), a, b), generator)

    yy, xx = torch.meshgrid(torch.arange(HAND), torch.arange(HAND), indexing="ij")
    checker = ((yy + xx) + torch.randint(0, 2, (n, 1, 1, 1), generator=generator)) % 2
    a, b = _patch_colours(generator, n)
    _place(images, hand_mask, torch.where(checker.bool(), a, b), generator, taken=face_mask)
    return images, face_mask, hand_mask
