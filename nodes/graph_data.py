"""Training data from the graph: the Train nodes' ``images`` / ``captions`` / ``face_masks`` /
``hand_masks`` checked and written as a dataset folder in the pack's format, which the job then
annotates as any folder (docs/formats.md, ``trainers/annotate.py``):

- ``image_NNNN.png`` and its caption as the sidecar ``image_NNNN.txt``;
- a given mask as ``masks/image_NNNN_face.png`` / ``_hand.png``: an 8-bit PNG without the
  annotator's tag, so it counts as the user's own mask and replaces detection; a kind without
  masks is detected as in a folder.

No ComfyUI import: the tensors are ComfyUI's IMAGE (B, H, W, 3) and MASK (B, H, W) or (H, W),
float in [0, 1], each input a list of them (the nodes take their inputs as lists, so the image
lists of ComfyUI's dataset nodes arrive whole).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .job_paths import InputRefused

STEM = "image_{:04d}"
MASKS = "masks"  # trainers/annotate.py's MASKS: the folder of a dataset's own masks
DIGEST_FILE = ".graph_data"  # hidden: annotate and the trainer skip dot files
KINDS = ("face", "hand")


def _frames(items, what: str, dims: int) -> list:
    """The single frames of a list of batches (or of single frames)."""
    frames = []
    for item in items or []:
        if item is None:
            continue
        if item.dim() == dims:
            item = item[None]
        if item.dim() != dims + 1:
            raise InputRefused(f"{what}: expected {'(batch, height, width, 3)' if dims == 3 else '(batch, height, width)'}"
                               f" tensors, got one of shape {tuple(item.shape)}")
        frames += list(item)
    return frames


def _captions(captions, count: int) -> list[str]:
    texts = [str(c) for c in (captions or []) if c is not None]
    if not texts:
        return [""] * count
    if len(texts) == 1:
        return texts * count
    if len(texts) != count:
        raise InputRefused(f"captions: {len(texts)} captions for {count} images: give one caption per image, or "
                           f"one for all")
    return texts


def graph_dataset(images, captions=None, face_masks=None, hand_masks=None):
    """(frames, captions, {kind: masks or None}) of the graph's data, checked; None without images.
    Refused (``InputRefused``, naming the input): captions or masks without images, a count or a
    size that does not match the images'."""
    frames = _frames(images, "images", 3)
    masks = {"face": _frames(face_masks, "face_masks", 2), "hand": _frames(hand_masks, "hand_masks", 2)}
    if not frames:
        given = [name for name, value in (("captions", captions), ("face_masks", masks["face"]),
                                          ("hand_masks", masks["hand"])) if value]
        if given:
            raise InputRefused(f"{', '.join(given)} given without images: link the images they belong to, or "
                               f"unlink them to train on the dataset folder")
        return None
    for frame in frames:
        if frame.shape[-1] not in (3, 4):
            raise InputRefused(f"images: expected RGB images, got {frame.shape[-1]} channels")
    for kind, found in masks.items():
        if not found:
            masks[kind] = None
            continue
        if len(found) != len(frames):
            raise InputRefused(f"{kind}_masks: {len(found)} masks for {len(frames)} images: give one mask per image")
        for i, (mask, frame) in enumerate(zip(found, frames)):
            if tuple(mask.shape) != tuple(frame.shape[:2]):
                raise InputRefused(f"{kind}_masks: mask {i} is {mask.shape[1]}x{mask.shape[0]}, its image is "
                                   f"{frame.shape[1]}x{frame.shape[0]}: masks must have their image's size")
    return frames, _captions(captions, len(frames)), masks


def _png_bytes(array, mode: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _uint8(tensor):
    import numpy as np

    return (np.clip(tensor.detach().cpu().float().numpy(), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def dataset_files(frames, captions, masks) -> dict[str, bytes]:
    """{relative path: content} of the dataset folder."""
    files = {}
    for i, (frame, caption) in enumerate(zip(frames, captions)):
        stem = STEM.format(i)
        files[f"{stem}.png"] = _png_bytes(_uint8(frame[..., :3]), "RGB")
        if caption:
            files[f"{stem}.txt"] = caption.encode("utf-8")
        for kind in KINDS:
            if masks[kind] is not None:
                files[f"{MASKS}/{stem}_{kind}.png"] = _png_bytes(_uint8(masks[kind][i]), "L")
    return files


def digest(files: dict[str, bytes]) -> str:
    """The data's fingerprint: a run of the same name resumes only on the same data."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()[:16]


def write_dataset(folder: Path, files: dict[str, bytes]) -> str:
    """Write the files as ``folder`` (replacing what another graph wrote there); returns their
    digest. Unchanged data is left as it is, so a resumed job finds its annotation still valid."""
    folder = Path(folder)
    fingerprint = digest(files)
    marker = folder / DIGEST_FILE
    if marker.is_file() and marker.read_text().strip() == fingerprint:
        return fingerprint
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (tmp / DIGEST_FILE).write_text(fingerprint)
    os.replace(tmp, folder)  # whole or not at all
    return fingerprint
