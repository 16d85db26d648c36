"""Face and hand masks: mediapipe detection (tiled, for small faces), box masks, latent masks.

Public entry points (stable; other parts of the pack and users call them):

- ``detect(image, *, min_confidence=0.5, tiles=True, models_dir=None) -> (faces, hands)``
- ``region_masks(image_or_detections, *, size=None, padding=0.1, dilation=0, feather=0)
  -> (face_mask, hand_mask)``
- ``to_latent(mask, (h, w))``: the mask on the latent grid, max/area pooled so that a region
  smaller than one latent cell never vanishes (the reference code's nearest resize can erase it).

Only numpy is imported here; mediapipe, cv2 and torch are imported inside the functions that
need them, so ComfyUI loads the pack quickly.
"""
from .detection import detect, release_detectors, require_mediapipe
from .images import as_rgb_array, load_rgb
from .model_files import MediapipeMissing, ModelFilesMissing, resolve_model_files
from .preview import draw_preview
from .regions import boxes_mask, region_masks, to_latent
from .types import Face, Hand

__all__ = [
    "Face", "Hand", "MediapipeMissing", "ModelFilesMissing", "as_rgb_array", "boxes_mask", "detect", "draw_preview",
    "load_rgb", "region_masks", "release_detectors", "require_mediapipe", "resolve_model_files", "to_latent",
]
