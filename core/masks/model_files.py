"""Where the mediapipe model files come from; nothing is ever downloaded here.

mediapipe 0.10.30 and later (the versions that install beside numpy 2 and on Python 3.13) ship
no model files. The face detector and the hand landmarker run on the tflite files bundled in the
mediapipe **0.10.21** wheel, which ``python -m trainers models`` extracts once (see
``trainers/models_setup.py``), or on the official MediaPipe Tasks files a user drops in.

A file is looked up, by its accepted names (official name first), in:
1. the folders given (``models_dir=``, ``--models-dir``; the node passes ComfyUI's
   ``models/mediapipe`` folders);
2. the folders in ``$FAIRHUMAN_MEDIAPIPE_DIRS`` (ComfyUI's, for the processes the pack starts),
   then the folders ``python -m trainers models`` writes to: ``<ComfyUI>/models/mediapipe`` when
   the pack sits in ComfyUI's ``custom_nodes``, and the pack's cache
   ``~/.cache/fairhuman-hgdpo/mediapipe`` (``$FAIRHUMAN_CACHE/mediapipe``);
3. an installed mediapipe 0.10.21 (its package folder holds the tflite files; the hand bundle is
   built from them into the cache once).
Otherwise ``ModelFilesMissing`` says which file is missing and the command that sets it up.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..fileio import write_bytes_atomic

MODELS_VERSION = "0.10.21"  # the last mediapipe whose wheel bundles the models

# Official MediaPipe Tasks files (a user may drop them in a models folder) ...
FACE_FILE = "blaze_face_short_range.tflite"
HAND_FILE = "hand_landmarker.task"
OFFICIAL_URLS = {
    FACE_FILE: "https://storage.googleapis.com/mediapipe-models/face_detector/blaze_face_short_range/float16/latest/blaze_face_short_range.tflite",
    HAND_FILE: "https://storage.googleapis.com/mediapipe-models/hand_landmarker/hand_landmarker/float16/latest/hand_landmarker.task",
}
# ... and the names ``python -m trainers models`` writes (never an official name: a user's
# official file is never overwritten, and a file's name says where it came from).
WHEEL_FACE_FILE = "face_detection_short_range.tflite"
WHEEL_HAND_FILE = f"hand_landmarker_{MODELS_VERSION}.task"
FACE_NAMES = (FACE_FILE, WHEEL_FACE_FILE)
HAND_NAMES = (HAND_FILE, WHEEL_HAND_FILE)

# The 0.10.21 package's model files (paths inside the ``mediapipe`` package) and their SHA-256,
# identical in the cp311 and cp312 manylinux x86_64 wheels. The pose pair is extracted for
# pose detection (the Tasks PoseLandmarker refuses these legacy files; see docs/masks.md).
WHEEL_FACE = "modules/face_detection/face_detection_short_range.tflite"
WHEEL_PALM = "modules/palm_detection/palm_detection_full.tflite"
WHEEL_LANDMARKS = "modules/hand_landmark/hand_landmark_full.tflite"
WHEEL_POSE_DETECTOR = "modules/pose_detection/pose_detection.tflite"
WHEEL_POSE_LANDMARKS = "modules/pose_landmark/pose_landmark_full.tflite"
WHEEL_SHA256 = {
    WHEEL_FACE: "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
    WHEEL_PALM: "1b14e9422c6ad006cde6581a46c8b90dd573c07ab7f3934b5589e7cea3f89a54",
    WHEEL_LANDMARKS: "11c272b891e1a99ab034208e23937a8008388cf11ed2a9d776ed3d01d0ba00e3",
    WHEEL_POSE_DETECTOR: "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c",
    WHEEL_POSE_LANDMARKS: "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f",
}
# The HandLandmarker bundle holds the palm detector and the landmark model under these names.
HAND_TASK_MEMBERS = {"hand_detector.tflite": WHEEL_PALM, "hand_landmarks_detector.tflite": WHEEL_LANDMARKS}
# The bundle is built byte-for-byte reproducibly (fixed member dates), so it has a checksum too.
HAND_TASK_SHA256 = "76839f622b2923ac8ee857300422283621490de0122425c2313ab8f040a7d100"

ModelsDir = str | os.PathLike | Iterable[str | os.PathLike] | None

PACK_ROOT = Path(__file__).absolute().parents[2]  # not resolved: a symlinked pack keeps its place


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("FAIRHUMAN_CACHE", Path.home() / ".cache" / "fairhuman-hgdpo")) / "mediapipe"


def comfyui_models_dir() -> Path | None:
    """``<ComfyUI>/models/mediapipe`` when the pack sits in ComfyUI's ``custom_nodes``."""
    if PACK_ROOT.parent.name == "custom_nodes" and (PACK_ROOT.parent.parent / "models").is_dir():
        return PACK_ROOT.parent.parent / "models" / "mediapipe"
    return None


# ComfyUI's registered models/mediapipe folders, set by the masks node in ComfyUI's process, so
# the trainer processes the pack starts (the training nodes' annotate stage) search them too.
FOLDERS_ENV = "FAIRHUMAN_MEDIAPIPE_DIRS"


def default_folders() -> list[Path]:
    """Where files are found without models_dir: the folders in ``$FAIRHUMAN_MEDIAPIPE_DIRS``,
    then where ``python -m trainers models`` writes by default."""
    listed = [Path(p) for p in os.environ.get(FOLDERS_ENV, "").split(os.pathsep) if p]
    comfy = comfyui_models_dir()
    folders = []
    for folder in listed + ([comfy] if comfy else []) + [cache_dir()]:
        if folder not in folders:
            folders.append(folder)
    return folders


def setup_command(dest: Path | None = None) -> str:
    """The command that sets the model files up, as a user types it."""
    where = f" --dest {_quote(dest)}" if dest is not None and dest not in default_folders()[:1] else ""
    return f"cd {_quote(PACK_ROOT)} && {_quote(sys.executable)} -m trainers models{where}"


class ModelFilesMissing(FileNotFoundError):
    """No usable mediapipe model files; the message names the files and the command to run."""


class MediapipeMissing(ImportError):
    """mediapipe cannot be imported in this Python; the message says what to install."""


def mediapipe_missing(err: ImportError) -> MediapipeMissing:
    requirements = _quote(PACK_ROOT / "requirements.txt")
    return MediapipeMissing(
        f"mediapipe is not installed in {sys.executable} ({err}): install the pack's requirements with "
        f"`{_quote(sys.executable)} -m pip install -r {requirements}`, then set up the model files once with "
        f"`{setup_command()}`.")


@dataclass(frozen=True)
class ModelFiles:
    face: Path
    hand: Path
    origin: str  # "models folder", "default folder", "mediapipe 0.10.21 package" or a mix


def _folders(models_dir: ModelsDir) -> list[Path]:
    if models_dir is None:
        return []
    if isinstance(models_dir, (str, os.PathLike)):
        models_dir = [models_dir]
    return [Path(p).expanduser() for p in models_dir]


def find_model_file(names: Iterable[str], folders: Iterable[Path]) -> Path | None:
    """The first existing ``folder/name``, folders outermost (a given folder beats a default)."""
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def installed_models_root() -> Path | None:
    """The package folder of an installed mediapipe that bundles the model files (0.10.21)."""
    import importlib.util

    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root if all((root / rel).is_file() for rel in (WHEEL_FACE, WHEEL_PALM, WHEEL_LANDMARKS)) else None


def build_hand_task(palm: bytes, landmarks: bytes) -> bytes:
    """The HandLandmarker ``.task`` zip of the two tflite models, the same bytes every time."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as bundle:
        for name, data in (("hand_detector.tflite", palm), ("hand_landmarks_detector.tflite", landmarks)):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            bundle.writestr(info, data)
    return buffer.getvalue()


def _from_installed_package(root: Path) -> tuple[Path, Path]:
    """The installed 0.10.21's face file as it is, and its hand bundle built once into the cache."""
    target = cache_dir() / WHEEL_HAND_FILE
    if not target.is_file():
        write_bytes_atomic(target, build_hand_task((root / WHEEL_PALM).read_bytes(),
                                                   (root / WHEEL_LANDMARKS).read_bytes()))
    return root / WHEEL_FACE, target


def _quote(text) -> str:
    return f'"{text}"' if " " in str(text) else str(text)


def resolve_model_files(models_dir: ModelsDir = None) -> ModelFiles:
    """The face-detector and hand-landmarker files to use (see the module docstring)."""
    given = _folders(models_dir)
    defaults = [f for f in default_folders() if f not in given]
    found = {}
    for kind, names in (("face", FACE_NAMES), ("hand", HAND_NAMES)):
        for origin, folders in (("models folder", given), ("default folder", defaults)):
            path = find_model_file(names, folders)
            if path is not None:
                found[kind] = (path, origin)
                break
    if len(found) < 2 and (root := installed_models_root()) is not None:
        wheel = dict(zip(("face", "hand"), _from_installed_package(root)))
        for kind in ("face", "hand"):
            found.setdefault(kind, (wheel[kind], f"mediapipe {MODELS_VERSION} package"))
    if len(found) < 2:
        missing = " and ".join(f"{names[0]} (or {names[1]})"
                               for kind, names in (("face", FACE_NAMES), ("hand", HAND_NAMES)) if kind not in found)
        searched = ", ".join(str(f) for f in given + defaults)
        raise ModelFilesMissing(
            f"mediapipe model files not found: {missing}. Set them up once with "
            f"`{setup_command(given[0] if given else None)}` (it takes them from the mediapipe "
            f"{MODELS_VERSION} wheel), or put the official {FACE_FILE} and {HAND_FILE} into ComfyUI's "
            f"models/mediapipe/ folder. Searched: {searched}."
        )
    (face, face_origin), (hand, hand_origin) = found["face"], found["hand"]
    origin = face_origin if face_origin == hand_origin else f"{face_origin} + {hand_origin}"
    return ModelFiles(face=face, hand=hand, origin=origin)
