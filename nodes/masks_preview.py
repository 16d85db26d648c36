"""The "Hand/Face Masks" node: face and hand masks of an image batch, with a preview.

mediapipe model files are looked up in ComfyUI's ``models/mediapipe/`` (registered here), where
``python -m trainers models`` puts them; see ``core.masks.model_files``. Neither mediapipe nor the
model files are needed to load the pack: without them the node fails with a message naming the
command that fixes it.
"""
from __future__ import annotations

import os

from ..core.masks.model_files import FACE_FILE, FOLDERS_ENV, HAND_FILE
from .node_api import io

import folder_paths

MODELS_KIND = "mediapipe"
folder_paths.add_model_folder_path(MODELS_KIND, os.path.join(folder_paths.models_dir, MODELS_KIND))
# The trainer processes the training nodes start find the model files in the same folders.
os.environ[FOLDERS_ENV] = os.pathsep.join(folder_paths.get_folder_paths(MODELS_KIND))


# The detection settings of core.masks.detect, as both Hand/Face nodes (masks, quality) take them.
def min_confidence_input(tooltip: str):
    return io.Float.Input("min_confidence", default=0.5, min=0.05, max=1.0, step=0.01, tooltip=tooltip)


def tiles_input(default: bool, tooltip: str):
    return io.Boolean.Input("tiles", default=default, tooltip=tooltip)


class HandFaceMasks(io.ComfyNode):
    """Detects faces and hands (mediapipe, tiled for small ones) and returns their masks."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FairHumanHandFaceMasks", display_name="Hand/Face Masks", category="FairHuman", inputs=[
                io.Image.Input("images", tooltip="Images to detect faces and hands in (a batch works; an image "
                                                 "without people gives empty masks)."),
                min_confidence_input("Minimum detection confidence (face score, palm and hand presence). Lower "
                                     "finds more, including false ones."),
                io.Float.Input("padding", default=0.1, min=0.0, max=2.0, step=0.01,
                               tooltip="Grow each box by this fraction of its width/height on every side."),
                io.Int.Input("dilation", default=0, min=0, max=512, step=1,
                             tooltip="Grow the masks by this many pixels (round corners)."),
                io.Int.Input("feather", default=0, min=0, max=512, step=1,
                             tooltip="Soft edge: the masks fall from 1 to 0 over this many pixels outside the "
                                     "regions."),
                io.Boolean.Input("faces", default=True, tooltip="Detect faces (off: the face mask is empty)."),
                io.Boolean.Input("hands", default=True, tooltip="Detect hands (off: the hand mask is empty)."),
                tiles_input(True, "Also detect on overlapping tiles: finds small faces and hands in group photos; "
                                  "about 3x slower than one whole-image pass."),
            ],
            outputs=[
                io.Mask.Output(display_name="face_mask", tooltip="1 on faces, 0 elsewhere."),
                io.Mask.Output(display_name="hand_mask", tooltip="1 on hands, 0 elsewhere."),
                io.Image.Output(display_name="preview", tooltip="The images with the masks tinted (faces orange, "
                                                                "hands cyan), boxes and scores."),
            ],
            description="Face and hand masks from mediapipe detection (FairHuman's regions), with a preview. Model "
                        "files: run `python -m trainers models` in the pack's folder once (it puts them in "
                        f"models/mediapipe/), or put the official {FACE_FILE} and {HAND_FILE} there.")

    @classmethod
    def execute(cls, images, min_confidence, padding, dilation, feather, faces, hands, tiles):
        return io.NodeOutput(*hand_face_masks(images, min_confidence, padding, dilation, feather, faces, hands,
                                              tiles))


def hand_face_masks(images, min_confidence, padding, dilation, feather, faces, hands, tiles) -> tuple:
    """(face masks, hand masks, previews) of an IMAGE batch."""
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


NODES = [HandFaceMasks]
