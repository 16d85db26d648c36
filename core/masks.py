"""Face and hand detection (mediapipe Tasks) and the region masks FairHuman trains with.

Small faces are FairHuman's whole point, and the face model that ships offline is a
short-range one that looks at a 128-px input: on a group photo it sees only the largest faces.
So ``detect`` runs each detector on the whole image *and* on overlapping tiles, maps the tile
boxes back and merges duplicates (non-maximum suppression, plus suppression of a box that lies
mostly inside a stronger one — what a face cut by a tile border leaves behind).

Model files are resolved in this order: an explicit models folder (ComfyUI's
``models/mediapipe``), then files derived from the models bundled in the mediapipe 0.10.21
wheel, then an error naming the official files. Nothing downloads. Detectors are created once
per models folder and reused.
"""
from __future__ import annotations

import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FACE_MODEL = "blaze_face_short_range.tflite"
HAND_MODEL = "hand_landmarker.task"
OFFICIAL_HINT = (
    f"put the official MediaPipe Tasks models {FACE_MODEL} and {HAND_MODEL} into a models folder "
    "(ComfyUI: models/mediapipe/), or install mediapipe==0.10.21, whose wheel bundles them"
)


@dataclass(frozen=True)
class Detection:
    """A face or hand: ``box`` is (x0, y0, x1, y1) in pixels of the input image."""

    kind: str
    box: tuple[float, float, float, float]
    score: float
    handedness: str | None = None
    handedness_score: float | None = None
    landmarks: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        out = {"box": [round(v, 2) for v in self.box], "score": round(self.score, 4)}
        if self.kind == "hand":
            out.update(handedness=self.handedness, handedness_score=round(self.handedness_score or 0.0, 4))
        return out


# ---- model files ----------------------------------------------------------------------------
def _cache_dir() -> Path:
    from .photos import cache_root

    return cache_root() / "mediapipe"


def _bundled_models() -> tuple[Path, Path] | None:
    """(face .tflite, hand .task) made from the tflite files inside a mediapipe 0.10.21 wheel."""
    try:
        import mediapipe
    except ImportError:
        return None
    root = Path(mediapipe.__file__).parent / "modules"
    face = root / "face_detection" / "face_detection_short_range.tflite"
    palm = root / "palm_detection" / "palm_detection_full.tflite"
    landmarks = root / "hand_landmark" / "hand_landmark_full.tflite"
    if not (face.is_file() and palm.is_file() and landmarks.is_file()):
        return None
    task = _cache_dir() / f"hand_landmarker_{mediapipe.__version__}.task"
    if not task.is_file():
        # A .task bundle is a zip of the two tflite models under these fixed names.
        task.parent.mkdir(parents=True, exist_ok=True)
        tmp = task.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w") as bundle:
            bundle.write(palm, "hand_detector.tflite")
            bundle.write(landmarks, "hand_landmarks_detector.tflite")
        tmp.replace(task)
    return face, task


def resolve_models(models_dir: str | Path | None = None) -> tuple[Path, Path]:
    searched = []
    if models_dir is not None:
        folder = Path(models_dir)
        face, hand = folder / FACE_MODEL, folder / HAND_MODEL
        if face.is_file() and hand.is_file():
            return face, hand
        searched.append(str(folder))
    bundled = _bundled_models()
    if bundled is not None:
        return bundled
    searched.append("the installed mediapipe wheel")
    raise FileNotFoundError(f"no face/hand detection models found (searched: {', '.join(searched)}); {OFFICIAL_HINT}")


# ---- detectors --------------------------------------------------------------------------------
class Detectors:
    """A face detector and a hand landmarker, created once and reused across images."""

    def __init__(self, models_dir=None, max_hands: int = 8):
        from mediapipe.tasks.python import BaseOptions, vision

        face_path, hand_path = resolve_models(models_dir)
        self.face = vision.FaceDetector.create_from_options(vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(face_path)), min_detection_confidence=0.3))
        self.hand = vision.HandLandmarker.create_from_options(vision.HandLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(hand_path)), num_hands=max_hands,
            min_hand_detection_confidence=0.3, min_hand_presence_confidence=0.3))
        self.lock = threading.Lock()  # a Tasks graph serves one call at a time

    def faces(self, rgb: np.ndarray) -> list[tuple[tuple, float]]:
        import mediapipe as mp

        result = self.face.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb)))
        out = []
        for det in result.detections:
            b = det.bounding_box
            out.append(((b.origin_x, b.origin_y, b.origin_x + b.width, b.origin_y + b.height),
                        float(det.categories[0].score)))
        return out

    def hands(self, rgb: np.ndarray) -> list[tuple[tuple, float, str, float, np.ndarray]]:
        import mediapipe as mp

        h, w = rgb.shape[:2]
        result = self.hand.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb)))
        out = []
        for marks, handed in zip(result.hand_landmarks, result.handedness):
            pts = np.array([[p.x * w, p.y * h] for p in marks], dtype=np.float32)
            box = (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))
            # The Tasks hand landmarker reports no palm-detection score; the handedness
            # classifier's probability is the confidence it exposes (also what the FairHuman
            # evaluation averages), so it serves as the hand's score.
            score = float(handed[0].score)
            out.append((box, score, handed[0].category_name, score, pts))
        return out


_DETECTORS: dict = {}
_DETECTORS_LOCK = threading.Lock()


def detectors(models_dir=None) -> Detectors:
    key = str(models_dir) if models_dir else None
    with _DETECTORS_LOCK:
        if key not in _DETECTORS:
            _DETECTORS[key] = Detectors(models_dir)
        return _DETECTORS[key]


# ---- geometry -----------------------------------------------------------------------------
def tiles(width: int, height: int, size: int, overlap: float = 0.5) -> list[tuple[int, int, int, int]]:
    """Overlapping square windows (x0, y0, x1, y1) covering the image; none when it is small."""
    if max(width, height) <= size * 1.25:
        return []
    stride = max(1, int(size * (1 - overlap)))

    def starts(extent):
        if extent <= size:
            return [0]
        found = list(range(0, extent - size, stride))
        return found + [extent - size]

    return [(x, y, min(x + size, width), min(y + size, height)) for y in starts(height) for x in starts(width)]


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _inside_fraction(a, b) -> float:
    """Fraction of box a's area that lies inside box b."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1])
    return ix * iy / area if area > 0 else 1.0


def merge(candidates: list, iou_threshold: float = 0.4, inside_threshold: float = 0.6) -> list:
    """Greedy NMS over (box, score, ...) tuples, strongest first."""
    kept = []
    for cand in sorted(candidates, key=lambda c: -c[1]):
        box = cand[0]
        if all(iou(box, k[0]) <= iou_threshold and _inside_fraction(box, k[0]) <= inside_threshold
               and _inside_fraction(k[0], box) <= inside_threshold for k in kept):
            kept.append(cand)
    return kept


def _clip(box, width, height):
    x0, y0, x1, y1 = box
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def as_rgb(image) -> np.ndarray:
    """An HxWx3 uint8 RGB array from an array (uint8, or float in [0,1]), PIL image or path."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    if not isinstance(image, np.ndarray):
        return np.asarray(image.convert("RGB"))
    arr = image
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        arr = arr[..., :3]
    return arr


def detect(image, *, min_confidence: float = 0.6, tiled: bool = True, faces: bool = True,
           hands: bool = True, models_dir=None, work_size: int = 1280, face_tile: int = 480,
           hand_tile: int = 720) -> tuple[list[Detection], list[Detection]]:
    """Faces and hands of one image, boxes in the image's own pixels, strongest first.

    The image is first scaled so its longer side is at most ``work_size`` (detection quality is
    set by the tiles, not by the megapixels); boxes are mapped back to full resolution.
    """
    rgb = as_rgb(image)
    height, width = rgb.shape[:2]
    scale = min(1.0, work_size / max(height, width))
    work = rgb
    if scale < 1.0:
        import cv2

        work = cv2.resize(rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    wh, ww = work.shape[:2]
    det = detectors(models_dir)
    found_faces, found_hands = [], []
    with det.lock:
        if faces:
            windows = [(0, 0, ww, wh)] + (tiles(ww, wh, face_tile) if tiled else [])
            for x0, y0, x1, y1 in windows:
                for box, score in det.faces(work[y0:y1, x0:x1]):
                    found_faces.append(((box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0), score))
        if hands:
            windows = [(0, 0, ww, wh)] + (tiles(ww, wh, hand_tile) if tiled else [])
            for x0, y0, x1, y1 in windows:
                for box, score, side, side_score, pts in det.hands(work[y0:y1, x0:x1]):
                    found_hands.append(((box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0), score,
                                        side, side_score, pts + np.array([x0, y0], np.float32)))
    inv = 1.0 / scale
    face_dets = [
        Detection("face", _clip(tuple(v * inv for v in box), width, height), score)
        for box, score in merge([f for f in found_faces if f[1] >= min_confidence])
    ]
    hand_dets = [
        Detection("hand", _clip(tuple(v * inv for v in box), width, height), score, side, side_score, pts * inv)
        for box, score, side, side_score, pts in merge([h for h in found_hands if h[1] >= min_confidence])
    ]
    return face_dets, hand_dets


# ---- masks --------------------------------------------------------------------------------
def box_mask(boxes, height: int, width: int, *, padding: float = 0.1, dilation: int = 0,
             feather: int = 0) -> np.ndarray:
    """A float32 HxW mask in [0,1] covering each box grown by ``padding`` (a fraction of its
    size on each side), then dilated by ``dilation`` px and feathered over ``feather`` px."""
    mask = np.zeros((height, width), np.float32)
    for x0, y0, x1, y1 in boxes:
        pw, ph = (x1 - x0) * padding, (y1 - y0) * padding
        xa, ya = int(np.floor(max(0, x0 - pw))), int(np.floor(max(0, y0 - ph)))
        xb, yb = int(np.ceil(min(width, x1 + pw))), int(np.ceil(min(height, y1 + ph)))
        mask[ya:max(yb, ya + 1), xa:max(xb, xa + 1)] = 1.0
    if dilation > 0 or feather > 0:
        import cv2

        if dilation > 0:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1, 2 * dilation + 1))
            mask = cv2.dilate(mask, kernel)
        if feather > 0:
            # Blur outward only: the box itself stays fully 1.
            blurred = cv2.GaussianBlur(mask, (0, 0), sigmaX=feather / 2.0)
            mask = np.maximum(mask, blurred)
    return np.clip(mask, 0.0, 1.0)


def region_masks(image_or_detections, *, size: tuple[int, int] | None = None, padding: float = 0.1,
                 dilation: int = 0, feather: int = 0, min_confidence: float = 0.6,
                 models_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """(face_mask, hand_mask), float32 HxW in [0,1].

    Give an image (detected here) or ``(faces, hands)`` detections with ``size=(height, width)``.
    """
    if isinstance(image_or_detections, tuple) and len(image_or_detections) == 2 and isinstance(
            image_or_detections[0], list):
        if size is None:
            raise ValueError("region_masks(detections) needs size=(height, width)")
        faces, hands = image_or_detections
        height, width = size
    else:
        rgb = as_rgb(image_or_detections)
        height, width = rgb.shape[:2]
        faces, hands = detect(rgb, min_confidence=min_confidence, models_dir=models_dir)
    make = lambda dets: box_mask([d.box for d in dets], height, width, padding=padding,  # noqa: E731
                                 dilation=dilation, feather=feather)
    return make(faces), make(hands)


def to_latent(mask, size: tuple[int, int]):
    """Downsample a mask (H,W) to the latent grid ``size`` = (h, w) by max pooling over each
    cell's pixels, so a region smaller than one latent cell is never erased (nearest
    interpolation, as the reference code uses, drops it unless it covers a cell's centre).

    Returns a float32 torch tensor (h, w) in [0, 1].
    """
    import torch
    import torch.nn.functional as F

    m = torch.as_tensor(np.asarray(mask, dtype=np.float32) if not isinstance(mask, torch.Tensor) else mask)
    m = m.float()[None, None]
    return F.adaptive_max_pool2d(m, size)[0, 0]
