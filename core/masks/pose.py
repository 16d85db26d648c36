"""Whole-body poses (mediapipe Tasks PoseLandmarker + the hand landmarker) and their
OpenPose-style rendering, the condition images of the FairHuman ControlNet.

Model file: the official ``pose_landmarker_full.task``, or ``pose_landmarker_0.10.21.task``, a
bundle of mediapipe 0.10.21's legacy ``pose_detection.tflite`` and ``pose_landmark_full.tflite``
that ``python -m trainers models`` builds. Those legacy files carry no input normalization
metadata, which the Tasks PoseLandmarker requires ("Input tensor has type float32: it requires
specifying NormalizationOptions metadata"), so the bundle adds it (``tflite_metadata``, which works
beside any mediapipe): the detector sees [-1, 1] pixels (mean 127.5, std 127.5), the landmark
model [0, 1] (mean 0, std 255), as the legacy graphs feed them. Looked up like the face/hand files
(``model_files``): the folders given, the default folders that ``python -m trainers models``
fills; else a bundle is built once into the cache from the pair found there or in an installed
0.10.21 package; else ``ModelFilesMissing``.

Rendering follows the OpenPose convention (18 COCO keypoints with its limb colours on black,
hands' 21 points with rainbow bones, face points in white), so a user's pose from another
OpenPose-style tool is the same kind of image.
"""
from __future__ import annotations

import atexit
import io
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import model_files as mf
from .images import as_rgb_array

POSE_FILE = "pose_landmarker_full.task"  # the official Tasks file
WHEEL_POSE_FILE = f"pose_landmarker_{mf.MODELS_VERSION}.task"  # ours, built from the wheel's pair
POSE_NAMES = (POSE_FILE, WHEEL_POSE_FILE)
POSE_URL = ("https://storage.googleapis.com/mediapipe-models/pose_landmarker/pose_landmarker_full/"
            "float16/latest/pose_landmarker_full.task")
RAW_PAIR = ("pose_detection.tflite", "pose_landmark_full.tflite")  # as earlier `trainers models` wrote them
MAX_PEOPLE = 8
VISIBLE = 0.5  # a keypoint below this visibility is not drawn

# mediapipe's 33 body landmarks -> OpenPose's 18 (COCO order); -1: the neck, the shoulders' midpoint.
OPENPOSE_FROM_MEDIAPIPE = (0, -1, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
# OpenPose's limbs (pairs of COCO keypoints) and their colours (RGB), in its order.
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
         (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
          (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
          (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
HAND_BONES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
              (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
FACE_POINTS = tuple(range(11))  # mediapipe's face landmarks: nose, eyes, ears, mouth corners


@dataclass(frozen=True)
class Person:
    """One body: ``keypoints`` (18, 2) OpenPose-order pixels, ``visible`` (18,) bool, ``face``
    (11, 2) pixels of the visible face landmarks (possibly fewer rows)."""

    keypoints: np.ndarray = field(repr=False)
    visible: np.ndarray = field(repr=False)
    face: np.ndarray = field(repr=False)

    @property
    def limbs(self) -> list[int]:
        """Indices (into ``LIMBS``) of the limbs with both ends visible."""
        return [i for i, (a, b) in enumerate(LIMBS) if self.visible[a] and self.visible[b]]


@dataclass(frozen=True)
class Pose:
    """Everything drawn into a condition image: people and hands (21, 2) in pixels."""

    people: list[Person]
    hands: list[np.ndarray]
    size: tuple[int, int]  # (width, height)

    def to_json(self) -> dict:
        return {"people": len(self.people), "limbs": [len(p.limbs) for p in self.people], "hands": len(self.hands)}


# ---- the model file ---------------------------------------------------------------------------
# The bundle's members: name in the .task zip, and the (mean, std) its input is normalized with.
POSE_TASK_MEMBERS = (("pose_detector.tflite", (127.5, 127.5)), ("pose_landmarks_detector.tflite", (0.0, 255.0)))


def build_pose_task(detector: bytes, landmarks: bytes) -> bytes:
    """A PoseLandmarker ``.task`` zip of the legacy pose pair with the normalization metadata the
    Tasks API needs; the same bytes every time."""
    from .tflite_metadata import with_image_metadata

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as bundle:
        for (name, (mean, std)), model in zip(POSE_TASK_MEMBERS, (detector, landmarks)):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            bundle.writestr(info, with_image_metadata(model, name="pose", mean=mean, std=std))
    return buffer.getvalue()


def is_pose_task(data: bytes) -> bool:
    """Whether ``data`` is a pose bundle as ``build_pose_task`` makes it (both members, each with
    its normalization in its metadata)."""
    from .tflite_metadata import read_image_normalization

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as bundle:
            return all(read_image_normalization(bundle.read(name)) == norm for name, norm in POSE_TASK_MEMBERS)
    except (zipfile.BadZipFile, KeyError, ValueError, IndexError, AttributeError, TypeError):
        return False


def _raw_pair(folders: list[Path]) -> tuple[Path, Path] | None:
    for folder in folders:
        if all((folder / name).is_file() for name in RAW_PAIR):
            return folder / RAW_PAIR[0], folder / RAW_PAIR[1]
    root = mf.installed_models_root()
    if root is not None and (root / mf.WHEEL_POSE_DETECTOR).is_file() and (root / mf.WHEEL_POSE_LANDMARKS).is_file():
        return root / mf.WHEEL_POSE_DETECTOR, root / mf.WHEEL_POSE_LANDMARKS
    return None


def resolve_pose_file(models_dir: mf.ModelsDir = None) -> Path:
    """The PoseLandmarker ``.task`` to use (see the module docstring)."""
    given = mf._folders(models_dir)
    folders = given + [f for f in mf.default_folders() if f not in given]
    found = mf.find_model_file(POSE_NAMES, folders)
    if found is not None:
        return found
    pair = _raw_pair(folders)
    if pair is not None:
        from ..fileio import write_bytes_atomic

        target = mf.cache_dir() / WHEEL_POSE_FILE
        write_bytes_atomic(target, build_pose_task(pair[0].read_bytes(), pair[1].read_bytes()))
        return target
    raise mf.ModelFilesMissing(
        f"pose model not found: {POSE_FILE} (or {WHEEL_POSE_FILE}, or the pair {' + '.join(RAW_PAIR)}). "
        f"Set it up once with `{mf.setup_command(given[0] if given else None)}` (it takes the pose pair "
        f"from the mediapipe {mf.MODELS_VERSION} wheel), or put the official {POSE_FILE} ({POSE_URL}) "
        f"into ComfyUI's models/mediapipe/ folder. Searched: {', '.join(str(f) for f in folders)}.")


# ---- detection ----------------------------------------------------------------------------------
_lock = threading.Lock()
_landmarkers: dict[tuple, tuple] = {}


def _landmarker(path: Path, min_confidence: float):
    key = (str(path), round(min_confidence, 4))
    with _lock:
        if key not in _landmarkers:
            from .detection import _import_mediapipe

            _, BaseOptions, vision = _import_mediapipe()
            task = vision.PoseLandmarker.create_from_options(vision.PoseLandmarkerOptions(
                base_options=BaseOptions(model_asset_path=str(path)), num_poses=MAX_PEOPLE,
                min_pose_detection_confidence=min_confidence, min_pose_presence_confidence=min_confidence,
            ))
            _landmarkers[key] = (task, threading.Lock())
        return _landmarkers[key]


def release_landmarkers() -> None:
    """Close every cached pose landmarker (re-created on the next ``detect_pose``)."""
    with _lock:
        for task, _ in _landmarkers.values():
            task.close()
        _landmarkers.clear()


atexit.register(release_landmarkers)  # as detection's detectors: no __del__ tracebacks at exit


def _person(marks, width: int, height: int) -> Person:
    xy = np.array([[m.x * width, m.y * height] for m in marks], dtype=np.float32)
    seen = np.array([(m.visibility or 0.0) >= VISIBLE and 0 <= m.x <= 1 and 0 <= m.y <= 1 for m in marks])
    keypoints = np.zeros((18, 2), np.float32)
    visible = np.zeros(18, bool)
    for k, src in enumerate(OPENPOSE_FROM_MEDIAPIPE):
        if src >= 0:
            keypoints[k], visible[k] = xy[src], seen[src]
        else:  # the neck
            keypoints[k], visible[k] = (xy[11] + xy[12]) / 2, seen[11] and seen[12]
    face = xy[list(FACE_POINTS)][seen[list(FACE_POINTS)]]
    return Person(keypoints, visible, face)


def detect_pose(image, *, min_confidence: float = 0.5, models_dir: mf.ModelsDir = None,
                hands: bool = True, hand_models_dir: mf.ModelsDir = None) -> Pose:
    """The people (PoseLandmarker, whole image, IMAGE mode) and hands (``detect``'s tiled hand
    landmarker) in ``image`` (array, PIL image or path); coordinates in its pixels."""
    from .detection import _mp_image, detect

    rgb = as_rgb_array(image)
    height, width = rgb.shape[:2]
    task, lock = _landmarker(resolve_pose_file(models_dir), float(min_confidence))
    with lock:
        result = task.detect(_mp_image(rgb))
    people = [_person(marks, width, height) for marks in result.pose_landmarks]
    found_hands = []
    if hands:
        _, hand_list = detect(rgb, min_confidence=min_confidence, faces=False,
                              models_dir=hand_models_dir if hand_models_dir is not None else models_dir)
        found_hands = [np.asarray(h.landmarks) for h in hand_list]
    return Pose(people, found_hands, (width, height))


# ---- rendering ----------------------------------------------------------------------------------
def _thickness(width: int, height: int) -> int:
    return max(2, round(max(width, height) / 256))  # OpenPose draws 4 px limbs at 512-1024 px


def render_pose(pose: Pose) -> np.ndarray:
    """The OpenPose-style condition image (H, W, 3) uint8 on black."""
    import cv2

    width, height = pose.size
    canvas = np.zeros((height, width, 3), np.uint8)
    thick = _thickness(width, height)

    def point(xy):
        return int(round(float(xy[0]))), int(round(float(xy[1])))

    for person in pose.people:
        for i in person.limbs:
            a, b = LIMBS[i]
            cv2.line(canvas, point(person.keypoints[a]), point(person.keypoints[b]), COLORS[i], thick, cv2.LINE_AA)
        for k in np.flatnonzero(person.visible):
            cv2.circle(canvas, point(person.keypoints[k]), thick, COLORS[k], -1, cv2.LINE_AA)
        for xy in person.face:
            cv2.circle(canvas, point(xy), max(1, thick // 2), (255, 255, 255), -1, cv2.LINE_AA)
    hand_thick = max(1, thick // 2)
    for hand in pose.hands:
        for i, (a, b) in enumerate(HAND_BONES):
            hue = int(180 * i / len(HAND_BONES))
            color = cv2.cvtColor(np.uint8([[[hue, 255, 255]]]), cv2.COLOR_HSV2RGB)[0, 0].tolist()
            cv2.line(canvas, point(hand[a]), point(hand[b]), color, hand_thick, cv2.LINE_AA)
        for xy in hand:
            cv2.circle(canvas, point(xy), hand_thick, (0, 0, 255), -1, cv2.LINE_AA)
    return canvas

