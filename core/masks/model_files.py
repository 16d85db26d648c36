"""Where the mediapipe model files come from; nothing is ever downloaded.

Order: (1) an explicit models folder (inside ComfyUI: ``models/mediapipe/``), holding the
official ``blaze_face_short_range.tflite`` and ``hand_landmarker.task``; (2) files derived
from the tflite models bundled in an installed mediapipe 0.10.21 wheel: the face detector's
``face_detection_short_range.tflite`` as is, and a HandLandmarker ``.task`` zip (palm detector +
landmark model under the names the Tasks API expects) built once into
``~/.cache/fairhuman-hgdpo/mediapipe/``; (3) an error naming the official files and where to
put them. mediapipe 0.10.30 and later ship no models, so there only (1) works.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

FACE_FILE = "blaze_face_short_range.tflite"
HAND_FILE = "hand_landmarker.task"
# Also accepted in a models folder: the wheel's own name of the same face model.
FACE_ALIASES = (FACE_FILE, "face_detection_short_range.tflite")
OFFICIAL_URLS = {
    FACE_FILE: "https://storage.googleapis.com/mediapipe-models/face_detector/blaze_face_short_range/float16/latest/blaze_face_short_range.tflite",
    HAND_FILE: "https://storage.googleapis.com/mediapipe-models/hand_landmarker/hand_landmarker/float16/latest/hand_landmarker.task",
}
# Inside the 0.10.21 wheel (relative to the mediapipe package folder).
WHEEL_FACE = "modules/face_detection/face_detection_short_range.tflite"
WHEEL_PALM = "modules/palm_detection/palm_detection_full.tflite"
WHEEL_LANDMARKS = "modules/hand_landmark/hand_landmark_full.tflite"

ModelsDir = str | os.PathLike | Iterable[str | os.PathLike] | None


def cache_dir() -> Path:
    return Path(os.environ.get("FAIRHUMAN_CACHE", Path.home() / ".cache" / "fairhuman-hgdpo")) / "mediapipe"


class ModelFilesMissing(FileNotFoundError):
    """No usable mediapipe model files; the message says which files and where to put them."""


@dataclass(frozen=True)
class ModelFiles:
    face: Path
    hand: Path
    origin: str  # "models folder", "mediapipe wheel", or a mix, for messages


def _folders(models_dir: ModelsDir) -> list[Path]:
    if models_dir is None:
        return []
    if isinstance(models_dir, (str, os.PathLike)):
        models_dir = [models_dir]
    return [Path(p).expanduser() for p in models_dir]


def _find(folders: list[Path], names: Iterable[str]) -> Path | None:
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _mediapipe_root() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _wheel_face(root: Path | None) -> Path | None:
    path = root / WHEEL_FACE if root else None
    return path if path and path.is_file() else None


def _wheel_hand_task(root: Path | None) -> Path | None:
    """The HandLandmarker bundle built from the wheel's two tflite files, cached by their size
    and mtime (a reinstalled mediapipe gets a fresh bundle)."""
    if root is None or not (root / WHEEL_PALM).is_file() or not (root / WHEEL_LANDMARKS).is_file():
        return None
    palm, marks = root / WHEEL_PALM, root / WHEEL_LANDMARKS
    stamp = "-".join(f"{p.stat().st_size}_{int(p.stat().st_mtime)}" for p in (palm, marks))
    target = cache_dir() / f"hand_landmarker_from_wheel_{stamp}.task"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as bundle:
            bundle.write(palm, "hand_detector.tflite")
            bundle.write(marks, "hand_landmarks_detector.tflite")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # atomic: concurrent builders each write a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def resolve_model_files(models_dir: ModelsDir = None) -> ModelFiles:
    """The face-detector and hand-landmarker files to use (see the module docstring)."""
    folders = _folders(models_dir)
    face, hand = _find(folders, FACE_ALIASES), _find(folders, (HAND_FILE,))
    origin = "models folder"
    if face is None or hand is None:
        root = _mediapipe_root()
        face = face or _wheel_face(root)
        hand = hand or _wheel_hand_task(root)
        origin = "mediapipe wheel" if not folders else "models folder + mediapipe wheel"
    if face is None or hand is None:
        missing = [name for name, found in ((FACE_FILE, face), (HAND_FILE, hand)) if found is None]
        searched = ", ".join(str(f) for f in folders) or "(no models folder given)"
        raise ModelFilesMissing(
            "mediapipe model files not found: " + ", ".join(missing) + ".\n"
            "This mediapipe has no bundled models (only mediapipe 0.10.21 ships them). Download the "
            "official files yourself:\n" + "\n".join(f"  {n}: {OFFICIAL_URLS[n]}" for n in missing) + "\n"
            "and put them in ComfyUI's models/mediapipe/ folder, or pass the folder with "
            "--models-dir (python -m trainers annotate) / models_dir= (core.masks.detect).\n"
            f"Searched: {searched}; mediapipe wheel: {_mediapipe_root() or 'mediapipe not installed'}"
        )
    return ModelFiles(face=face, hand=hand, origin=origin)
