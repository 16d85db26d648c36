"""The "Hand/Face Masks" node: face and hand masks of an image batch, with a preview.

mediapipe model files are looked up in ComfyUI's ``models/mediapipe/`` (registered here), where
``python -m trainers models`` puts them; see ``core.masks.model_files``. Neither mediapipe nor the
model files are needed to load the pack: without them the node fails with a message naming the
command that fixes it.
"""
from __future__ import annotations

import os

from ..core.masks.model_files import FACE_FILE, FOLDERS_ENV, HAND_FILE

try:
    import folder_paths
except ImportError:  # imported outside ComfyUI (pytest imports the pack root's __init__.py)
    folder_paths = None

MODELS_KIND = "mediapipe"
if folder_paths is not None:
    folder_paths.add_model_folder_path(MODELS_KIND, os.path.join(folder_paths.models_dir, MODELS_KIND))
    # The trainer processes the training nodes start find the model files in the same folders.
    os.environ[FOLDERS_ENV] = os.pathsep.join(folder_paths.get_folder_paths(MODELS_KIND))


class HandFaceMasks:
    """Detects faces and hands (mediapipe, tiled for small ones) and returns their masks."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Images to detect faces and hands in (a batch works; "
                                            "an image without people gives empty masks)."}),
            "min_confidence": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 1.0, "step": 0.01,
                                         "tooltip": "Minimum detection confidence (face score, palm and hand "
                                                    "presence). Lower finds more, including false ones."}),
            "padding": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 2.0, "step": 0.01,
                                  "tooltip": "Grow each box by this fraction of its width/height on every side."}),
            "dilation": ("INT", {"default": 0, "min": 0, "max": 512, "step": 1,
                                 "tooltip": "Grow the masks by this many pixels (round corners)."}),
            "feather": ("INT", {"default": 0, "min": 0, "max": 512, "step": 1,
                                "tooltip": "Soft edge: the masks fall from 1 to 0 over this many pixels "
                                           "outside the regions."}),
            "faces": ("BOOLEAN", {"default": True, "tooltip": "Detect faces (off: the face mask is empty)."}),
            "hands": ("BOOLEAN", {"default": True, "tooltip": "Detect hands (off: the hand mask is empty)."}),
            "tiles": ("BOOLEAN", {"default": True,
                                  "tooltip": "Also detect on overlapping tiles: finds small faces and hands in "
                                             "group photos; about 3x slower than one whole-image pass."}),
        }}

    RETURN_TYPES = ("MASK", "MASK", "IMAGE")
    RETURN_NAMES = ("face_mask", "hand_mask", "preview")
    OUTPUT_TOOLTIPS = ("1 on faces, 0 elsewhere.", "1 on hands, 0 elsewhere.",
                       "The images with the masks tinted (faces orange, hands cyan), boxes and scores.")
    FUNCTION = "run"
    CATEGORY = "FairHuman"
    DESCRIPTION = ("Face and hand masks from mediapipe detection (FairHuman's regions), with a preview. "
                   "Model files: run `python -m trainers models` in the pack's folder once (it puts them in "
                   f"models/mediapipe/), or put the official {FACE_FILE} and {HAND_FILE} there.")

    def run(self, images, min_confidence, padding, dilation, feather, faces, hands, tiles):
        import numpy as np
        import torch

        import comfy.model_management
        import comfy.utils

        from ..core.masks import as_rgb_array, boxes_mask, detect, draw_preview

        # Every registered folder, existing or not: the first is where the error message says to set up.
        folders = list(folder_paths.get_folder_paths(MODELS_KIND))
        bar = comfy.utils.ProgressBar(images.shape[0])
        face_masks, hand_masks, previews = [], [], []
        for frame in images:
            comfy.model_management.throw_exception_if_processing_interrupted()
            rgb = as_rgb_array(frame.cpu().float().numpy())
            found_faces, found_hands = detect(rgb, min_confidence=min_confidence, tiles=tiles,
                                              models_dir=folders or None, faces=faces, hands=hands)
            size = rgb.shape[:2]
            options = dict(padding=padding, dilation=dilation, feather=feather)
            face_mask = boxes_mask([f.box for f in found_faces], size, **options)
            hand_mask = boxes_mask([h.box for h in found_hands], size, **options)
            face_masks.append(face_mask)
            hand_masks.append(hand_mask)
            previews.append(draw_preview(rgb, found_faces, found_hands, face_mask, hand_mask))
            bar.update(1)
        return (torch.from_numpy(np.stack(face_masks)), torch.from_numpy(np.stack(hand_masks)),
                torch.from_numpy(np.stack(previews).astype(np.float32) / 255.0))


NODE_CLASS_MAPPINGS = {"FairHumanHandFaceMasks": HandFaceMasks}
NODE_DISPLAY_NAME_MAPPINGS = {"FairHumanHandFaceMasks": "Hand/Face Masks"}
