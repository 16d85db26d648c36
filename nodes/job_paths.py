"""Where training jobs may read and write, checked before anything is written.

Every name and path here comes from a node input or an HTTP request, and ComfyUI can listen on
all interfaces: so a dataset must resolve (after symlinks) inside ComfyUI's input directory or a
root the user allowed in ``FAIRHUMAN_ALLOWED_ROOTS`` (folders separated by ``os.pathsep``), an
output name is a plain file name, and job folders live only under the runs folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..core.masks.images import IMAGE_SUFFIXES

ALLOWED_ROOTS_ENV = "FAIRHUMAN_ALLOWED_ROOTS"
RUNS_FOLDER = "fairhuman_runs"  # under ComfyUI's output directory
OUTPUT_SUBFOLDER = "fairhuman"  # where trained files land: models/loras/fairhuman, models/controlnet/fairhuman
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,99}$")


class InputRefused(ValueError):
    """A node input that must not be used; the message names it and the fix."""


def model_file(kind: str, name: str) -> str:
    """The path of a file ComfyUI lists in a models folder kind (``checkpoints``, ``loras``, ...)."""
    import folder_paths

    path = folder_paths.get_full_path(kind, name)
    if path is None or not os.path.isfile(path):
        searched = ", ".join(folder_paths.get_folder_paths(kind))
        raise FileNotFoundError(f"{kind} file {name!r} not found (searched: {searched})")
    return path


def sanitize_output_name(text: str) -> str:
    """The output name as a file stem, or ``InputRefused``: no separators, no ``..``, no
    leading dot, at most 100 of letters, digits, space and ``_.+-``."""
    name = (text or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if "/" in name or "\\" in name or ".." in name or os.sep in name:
        raise InputRefused(f"output_name {text!r} may not contain path separators or '..': use a plain "
                           f"name such as my_hands")
    if not _NAME.match(name):
        raise InputRefused(f"output_name {text!r} is not a plain name: use 1-100 letters, digits, spaces or "
                           f"_ . + - (starting with a letter or digit), e.g. my_hands")
    return name


def allowed_roots(input_dir: str | os.PathLike) -> list[Path]:
    """ComfyUI's input directory, then the folders of FAIRHUMAN_ALLOWED_ROOTS, resolved."""
    roots = [Path(input_dir)]
    roots += [Path(p).expanduser() for p in os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return [r.resolve() for r in roots]


def resolve_folder(text: str, input_dir: str | os.PathLike, what: str = "dataset") -> Path:
    """A folder named by a node input (relative to the input directory, or absolute), resolved
    with its symlinks, if it lies inside an allowed root; else ``InputRefused``."""
    raw = (text or "").strip()
    roots = allowed_roots(input_dir)
    if not raw:
        raise InputRefused(f"{what} is empty: name a folder inside ComfyUI's input directory ({roots[0]})")
    path = Path(raw).expanduser()
    resolved = (path if path.is_absolute() else roots[0] / path).resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise InputRefused(
            f"{what} {raw!r} resolves to {resolved}, outside the allowed folders ({', '.join(map(str, roots))}): "
            f"put it in ComfyUI's input directory, or add its parent folder to {ALLOWED_ROOTS_ENV}")
    if not resolved.is_dir():
        raise InputRefused(f"{what} {raw!r}: {resolved} is not a folder (a folder inside {roots[0]} is expected)")
    return resolved


def resolve_dataset(text: str, input_dir: str | os.PathLike) -> Path:
    """The dataset folder, inside an allowed root and holding images (or its metadata.jsonl)."""
    resolved = resolve_folder(text, input_dir, "dataset")
    if not (resolved / "metadata.jsonl").is_file() and not has_images(resolved):
        raise InputRefused(f"dataset folder {resolved} has no images ({', '.join(IMAGE_SUFFIXES)}): "
                           f"put the training photos in it")
    return resolved


def has_images(folder: Path) -> bool:
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".") for f in files):
            return True
    return False


def inside(path: Path, root: Path) -> bool:
    """``path`` (resolved) is ``root`` or below it."""
    resolved, root = Path(path).resolve(), Path(root).resolve()
    return resolved == root or resolved.is_relative_to(root)
