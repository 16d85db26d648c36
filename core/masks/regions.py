"""Masks from detections, and masks on the latent grid."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .types import Box


def boxes_mask(boxes: Sequence[Box], size: tuple[int, int], *, padding: float = 0.1, dilation: int = 0,
               feather: int = 0) -> np.ndarray:
    """float32 (H, W) mask in [0, 1]: 1 inside every box (each padded by ``padding`` times its
    width/height on every side, then grown by ``dilation`` px with round corners), falling
    linearly to 0 over ``feather`` px outside. Every pixel a box touches is 1."""
    height, width = (int(v) for v in size)
    if padding < 0 or dilation < 0 or feather < 0:
        raise ValueError(f"padding, dilation and feather must be >= 0 (got {padding}, {dilation}, {feather})")
    mask = np.zeros((height, width), np.float32)
    for x0, y0, x1, y1 in boxes:
        px, py = (x1 - x0) * padding, (y1 - y0) * padding
        c0, r0 = max(0, math.floor(x0 - px)), max(0, math.floor(y0 - py))
        c1, r1 = min(width, math.ceil(x1 + px)), min(height, math.ceil(y1 + py))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = 1.0
    if (dilation or feather) and mask.any():
        import cv2

        # distance of each outside pixel to the nearest mask pixel
        distance = cv2.distanceTransform((mask == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        grown = distance - float(dilation)
        if feather:
            ramp = np.clip(1.0 - grown / float(feather + 1), 0.0, 1.0)
            mask = np.where(grown <= 0, 1.0, ramp).astype(np.float32)
        else:
            mask = (grown <= 0).astype(np.float32)
    return mask


def region_masks(image_or_detections: Any, *, size: tuple[int, int] | None = None, padding: float = 0.1,
                 dilation: int = 0, feather: int = 0, **detect_options) -> tuple[np.ndarray, np.ndarray]:
    """(face_mask, hand_mask), float32 (H, W) in [0, 1].

    ``image_or_detections``: an image (array, PIL image or path; detected with ``detect`` and
    ``detect_options``) or the ``(faces, hands)`` pair that ``detect`` returned, in which case
    ``size=(height, width)`` of the image is required.
    """
    if isinstance(image_or_detections, tuple) and len(image_or_detections) == 2 and all(
            isinstance(v, (list, tuple)) for v in image_or_detections):
        faces, hands = image_or_detections
        if size is None:
            raise ValueError("region_masks(detections) needs size=(height, width) of the image")
    else:
        from .detection import detect
        from .images import as_rgb_array

        rgb = as_rgb_array(image_or_detections)
        faces, hands = detect(rgb, **detect_options)
        size = size or rgb.shape[:2]
    options = dict(padding=padding, dilation=dilation, feather=feather)
    return (boxes_mask([f.box for f in faces], size, **options),
            boxes_mask([h.box for h in hands], size, **options))


def to_latent(mask: Any, size: tuple[int, int], mode: str = "max"):
    """``mask`` (..., H, W) resized to the latent grid ``size=(h, w)``, float32, same kind as
    the input (numpy array or torch tensor).

    ``mode="max"`` (default): a cell is the largest mask value in the pixels it covers, so any
    region, however small, keeps full weight; ``"area"``: the mean, a soft coverage. Both pool
    over every pixel (adaptive pooling, also for sizes that are not a multiple), unlike nearest
    resizing, which samples one pixel per cell and erases regions between the samples.
    """
    import torch
    import torch.nn.functional as F

    if mode not in ("max", "area"):
        raise ValueError(f"mode must be 'max' or 'area', got {mode!r}")
    is_numpy = not isinstance(mask, torch.Tensor)
    tensor = torch.as_tensor(np.asarray(mask) if is_numpy else mask).float()
    if tensor.ndim < 2:
        raise ValueError(f"mask must be (..., H, W), got shape {tuple(tensor.shape)}")
    lead = tensor.shape[:-2]
    flat = tensor.reshape(-1, 1, *tensor.shape[-2:])
    out_size = (int(size[0]), int(size[1]))
    pooled = F.adaptive_max_pool2d(flat, out_size) if mode == "max" else F.adaptive_avg_pool2d(flat, out_size)
    pooled = pooled.reshape(*lead, *out_size)
    return pooled.numpy().astype(np.float32) if is_numpy else pooled
