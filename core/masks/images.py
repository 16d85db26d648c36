"""Turning what callers pass (array, PIL image, path) into an HxWx3 uint8 RGB array."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# The files a folder of photos is read for (annotate, the Train nodes' dataset check), lower case.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB, upright (EXIF orientation applied, as ComfyUI's
    LoadImage does), fully decoded so a truncated file fails here and not later."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def as_rgb_array(image: Any) -> np.ndarray:
    """HxWx3 uint8 RGB from an array (HxW, HxWx1/3/4; uint8, or float in [0, 1]), a PIL image
    or a path."""
    if isinstance(image, (str, Path)):
        return load_rgb(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image, without importing PIL
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"expected an HxWx3 RGB image, got an array of shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"expected uint8 or float pixels in [0, 1], got {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[..., :3])
