"""``detect``: faces and hands with mediapipe's Tasks API (FaceDetector, HandLandmarker).

Detectors are created once per process for each (model files, min_confidence) and reused;
``detect`` runs them on the whole image and on overlapping tiles (faces: 480 px, hands: 640 px,
half overlap; see ``tiling``) and merges duplicates. IMAGE running mode: nothing is tracked from
one image to the next, so a result depends on its image alone.
"""
from __future__ import annotations

import atexit
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .images import as_rgb_array
from .model_files import ModelFiles, ModelsDir, mediapipe_missing, resolve_model_files
from .tiling import merge_duplicates, tile_windows, touches_inner_edge
from .types import Face, Hand

FACE_TILE = 480  # the face model sees 128 px: a 480-px tile makes faces ~3.75x bigger for it
HAND_TILE = 640  # the palm model sees 192 px
TILE_OVERLAP = 0.5
MAX_HANDS_PER_PASS = 6
# Each tile is one more chance for a false face (a knee, a glass at ~0.5-0.6 on the sample
# photos) while real faces score 0.75-0.97 in a tile that frames them: tile faces must reach
# halfway from min_confidence to 1 (0.75 at the default 0.5). Not for hands: a stricter palm
# threshold in tiles loses real hands (sample3's, at any threshold >= 0.6) before it drops the
# one false hand seen on the samples (a sandal strap in sample5).
TILE_MARGIN = 0.5
DEFAULT_MAX_SIDE = 2048  # larger images are detected on a downscaled copy (tile count grows with area)

_lock = threading.Lock()
_cache: dict[tuple, "_Detectors"] = {}


@dataclass
class _Detectors:
    face: Any
    hand: Any
    lock: threading.Lock


def _import_mediapipe():
    # mediapipe's C++ side logs every graph start at INFO level; keep the console readable.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision
    except ImportError as err:  # a ComfyUI whose Python lacks the pack's requirements
        raise mediapipe_missing(err) from err
    return mp, BaseOptions, vision


def require_mediapipe() -> None:
    """Raise ``MediapipeMissing`` (naming what to install) when mediapipe cannot be imported."""
    _import_mediapipe()


def tile_confidence(min_confidence: float) -> float:
    return min_confidence + (1.0 - min_confidence) * TILE_MARGIN


def _detectors(files: ModelFiles, min_confidence: float) -> _Detectors:
    key = (str(files.face), str(files.hand), round(min_confidence, 4))
    with _lock:
        found = _cache.get(key)
        if found is None:
            _, BaseOptions, vision = _import_mediapipe()
            face = vision.FaceDetector.create_from_options(vision.FaceDetectorOptions(
                base_options=BaseOptions(model_asset_path=str(files.face)),
                min_detection_confidence=min_confidence,
            ))
            hand = vision.HandLandmarker.create_from_options(vision.HandLandmarkerOptions(
                base_options=BaseOptions(model_asset_path=str(files.hand)),
                num_hands=MAX_HANDS_PER_PASS,
                min_hand_detection_confidence=min_confidence,
                min_hand_presence_confidence=min_confidence,
            ))
            found = _cache[key] = _Detectors(face, hand, threading.Lock())
        return found


def release_detectors() -> None:
    """Close every cached detector (they are re-created on the next ``detect``)."""
    with _lock:
        for found in _cache.values():
            for task in (found.face, found.hand):
                task.close()
        _cache.clear()


# Closed before the interpreter tears modules down: mediapipe >= 0.10.30's detectors, left to
# their __del__ at exit, print "TypeError: 'NoneType' object is not callable" tracebacks.
atexit.register(release_detectors)


def _mp_image(pixels: np.ndarray):
    mp, _, _ = _import_mediapipe()
    return mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(pixels))


def _windows(height: int, width: int, tile: int, tiles: bool):
    whole = (0, 0, width, height)
    return [whole] + (tile_windows(height, width, tile, TILE_OVERLAP) if tiles else [])


def _clip(box, width: int, height: int):
    x0, y0, x1, y1 = box
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
            min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def _find_faces(detector, rgb: np.ndarray, tiles: bool, min_confidence: float) -> list[Face]:
    height, width = rgb.shape[:2]
    tile_min = tile_confidence(min_confidence)
    boxes, scores, partial = [], [], []
    for win in _windows(height, width, FACE_TILE, tiles):
        x0, y0, x1, y1 = win
        whole = win == (0, 0, width, height)
        for found in detector.detect(_mp_image(rgb[y0:y1, x0:x1])).detections:
            if not whole and found.categories[0].score < tile_min:
                continue
            bb = found.bounding_box
            raw = (x0 + bb.origin_x, y0 + bb.origin_y, x0 + bb.origin_x + bb.width, y0 + bb.origin_y + bb.height)
            box = _clip(tuple(float(v) for v in raw), width, height)
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            boxes.append(box)
            scores.append(float(found.categories[0].score))
            partial.append(not whole and touches_inner_edge(raw, win, height, width))
    keep = merge_duplicates(boxes, scores, partial)
    return [Face(box=boxes[i], score=scores[i]) for i in keep]


def _find_hands(landmarker, rgb: np.ndarray, tiles: bool) -> list[Hand]:
    height, width = rgb.shape[:2]
    boxes, scores, partial, extra = [], [], [], []
    for win in _windows(height, width, HAND_TILE, tiles):
        x0, y0, x1, y1 = win
        result = landmarker.detect(_mp_image(rgb[y0:y1, x0:x1]))
        for marks, handed in zip(result.hand_landmarks, result.handedness):
            points = np.array([[x0 + p.x * (x1 - x0), y0 + p.y * (y1 - y0)] for p in marks], dtype=np.float32)
            raw = (float(points[:, 0].min()), float(points[:, 1].min()),
                   float(points[:, 0].max()), float(points[:, 1].max()))
            box = _clip(raw, width, height)
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            boxes.append(box)
            scores.append(float(handed[0].score))
            partial.append(win != (0, 0, width, height) and touches_inner_edge(raw, win, height, width))
            extra.append((handed[0].category_name, points))
    keep = merge_duplicates(boxes, scores, partial)
    hands = []
    for i in keep:
        label, points = extra[i]
        points.setflags(write=False)
        hands.append(Hand(box=boxes[i], score=scores[i], handedness=label, handedness_score=scores[i],
                          landmarks=points))
    return hands


def _rescale(box, factor: float):
    return tuple(v * factor for v in box)


def detect(image, *, min_confidence: float = 0.5, tiles: bool = True, models_dir: ModelsDir = None,
           faces: bool = True, hands: bool = True, max_side: int | None = DEFAULT_MAX_SIDE
           ) -> tuple[list[Face], list[Hand]]:
    """Faces and hands in ``image`` (HxWx3 uint8 RGB array, PIL image or path).

    Boxes are (x0, y0, x1, y1) floats in pixels of the input image, inside it; each list is
    sorted left to right. ``tiles`` adds the overlapping-tile passes that find small faces and
    hands; ``faces``/``hands`` skip a detector; images whose long side exceeds ``max_side`` are
    detected on a downscaled copy (boxes are mapped back). ``models_dir``: a folder (or folders)
    with the official model files; see ``model_files`` for the resolution order.
    """
    if not 0.0 < float(min_confidence) <= 1.0:
        raise ValueError(f"min_confidence must be in (0, 1], got {min_confidence}")
    rgb = as_rgb_array(image)
    height, width = rgb.shape[:2]
    factor = 1.0
    if max_side and max(height, width) > max_side:
        import cv2

        factor = max(height, width) / max_side
        size = (max(1, round(width / factor)), max(1, round(height / factor)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    det = _detectors(resolve_model_files(models_dir), float(min_confidence))
    with det.lock:
        found_faces = _find_faces(det.face, rgb, tiles, float(min_confidence)) if faces else []
        found_hands = _find_hands(det.hand, rgb, tiles) if hands else []
    if factor != 1.0:
        found_faces = [Face(box=_clip(_rescale(f.box, factor), width, height), score=f.score) for f in found_faces]
        scaled = []
        for h in found_hands:
            points = h.landmarks * np.float32(factor)
            points.setflags(write=False)
            scaled.append(Hand(box=_clip(_rescale(h.box, factor), width, height), score=h.score,
                               handedness=h.handedness, handedness_score=h.handedness_score, landmarks=points))
        found_hands = scaled
    return sorted(found_faces, key=lambda f: f.box), sorted(found_hands, key=lambda h: h.box)
