"""``python -m trainers annotate DIR``: detect faces and hands in a folder of images and write
the FairHuman dataset: ``metadata.jsonl`` (one record per image) and face/hand mask PNGs.

Record (one JSON object per line; the trainer reads it)::

    {"image": "<path relative to the jsonl's folder>", "text": "<caption or ''>",
     "width": W, "height": H, "status": "ok" | "no_people" | "error", "reason": null | "<why>",
     "faces": [{"box": [x0, y0, x1, y1], "score": s}],
     "hands": [{"box": [...], "score": s, "handedness": "Left", "handedness_score": s}],
     "mask_face": "<png path relative to the jsonl's folder, or null>", "mask_hand": ...}

Captions come from a sidecar ``<stem>.txt`` (the kohya convention). Masks go to ``masks/`` in
the output folder as 8-bit grayscale PNGs of the image's size, tagged as ours in a PNG text
chunk: a mask file without the tag was made by the user and is kept and used, never replaced.
The run is resumable (images already in metadata.jsonl are skipped; each record is appended as
soon as its image is done), survives bad files (each gets a record with the reason) and uses
every core (a process pool; each process creates its detectors once).
Under torchrun / accelerate launch and with ``--shard I/N`` (then ``--merge``) the items are split
over processes and shards (``trainers/shards.py``, docs/scale-out.md); the merged output is the
one-process output.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from core.fileio import JsonlError, atomic_path
from core.masks.images import IMAGE_SUFFIXES

from . import shards

METADATA = "metadata.jsonl"
MASKS = "masks"
SIDE_FILES = {".txt"}  # captions: read with their image, not images themselves
OWNER_KEY, OWNER_VALUE = "fairhuman-hgdpo", "annotate"  # PNG text chunk marking our masks
DONE_STATUS = ("ok", "no_people")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="folder of images (searched recursively), with optional <stem>.txt captions")
    parser.add_argument("--out", type=Path, default=None,
                        help="where metadata.jsonl and masks/ go (default: DIR itself)")
    parser.add_argument("--min-confidence", type=float, default=0.5,
                        help="minimum face-detection / hand-presence confidence (default 0.5)")
    parser.add_argument("--padding", type=float, default=0.1,
                        help="grow each box by this fraction of its size on every side (default 0.1)")
    parser.add_argument("--dilation", type=int, default=0, help="grow masks by this many pixels (default 0)")
    parser.add_argument("--feather", type=int, default=0,
                        help="soft edge: masks fall to 0 over this many pixels outside the region (default 0)")
    parser.add_argument("--no-tiles", action="store_true",
                        help="detect on the whole image only (faster; misses small faces and hands)")
    parser.add_argument("--max-side", type=int, default=2048,
                        help="detect on a copy downscaled to this long side (default 2048; boxes map back)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="folder with the model files (default: where `python -m trainers models` "
                             "puts them; see docs/masks.md)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: one per CPU core, shared among the launcher's processes on this "
                             "machine; 1 runs in this process)")
    parser.add_argument("--retry-errors", action="store_true",
                        help="annotate again the images whose record has status 'error'")
    parser.add_argument("--pose", action="store_true",
                        help="also render an OpenPose-style whole-body pose (body, hands, face points) per image "
                             "as masks/<stem>_condition.png, the FairHuman ControlNet's condition; a "
                             "<stem>_condition.png of your own (depth, another tool's pose) is kept and used")
    shards.add_arguments(parser)


@dataclass(frozen=True)
class Settings:
    min_confidence: float
    padding: float
    dilation: int
    feather: int
    tiles: bool
    max_side: int | None
    models_dir: str | None
    pose: bool = False


# One image to annotate (a worker process's unit of work; not a training job).
@dataclass(frozen=True)
class ImageTask:
    image: Path  # absolute
    key: str  # the record's "image": path relative to the output folder
    caption: Path | None
    mask_face: Path  # absolute
    mask_hand: Path
    out: Path
    condition: Path | None = None  # absolute; the ControlNet condition image


# ---- one image (runs in a worker process) -----------------------------------------------------
def read_caption(path: Path | None) -> tuple[str, str | None]:
    """(caption, note): a non-UTF-8 file is decoded with replacement characters and noted."""
    if path is None or not path.is_file():
        return "", None
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError as err:
        return raw.decode("utf-8", errors="replace").strip(), (
            f"caption {path.name} is not UTF-8 (byte {err.start}): decoded with replacement characters")


def is_our_mask(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "text", {}).get(OWNER_KEY) == OWNER_VALUE
    except Exception:
        return False  # unreadable: not ours either, so it is left alone


def write_mask(path: Path, mask) -> None:
    """8-bit grayscale PNG (an RGB uint8 array: RGB) tagged as ours, written atomically (a killed run
    leaves no half file)."""
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(OWNER_KEY, OWNER_VALUE)
    with atomic_path(path) as tmp:
        image = (Image.fromarray(mask, mode="RGB") if np.ndim(mask) == 3
                 else Image.fromarray((np.clip(mask, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L"))
        image.save(tmp, format="PNG", pnginfo=info)


def _relative(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def annotate_one(task: ImageTask, settings: Settings) -> dict:
    """The record of one image; its masks are written (or the user's kept) on the way."""
    from core.masks import boxes_mask, detect, load_rgb

    record = {"image": task.key, "text": "", "width": None, "height": None, "status": "error", "reason": None,
              "faces": [], "hands": [], "mask_face": None, "mask_hand": None}
    notes = []
    try:
        record["text"], note = read_caption(task.caption)
        if note:
            notes.append(note)
    except OSError as err:
        notes.append(f"caption unreadable: {err}")
    try:
        rgb = load_rgb(task.image)
    except Exception as err:  # corrupt, truncated, empty, not an image: PIL raises many kinds
        record["reason"] = "; ".join([f"unreadable image: {type(err).__name__}: {err}"] + notes)
        return record
    height, width = rgb.shape[:2]
    record.update(width=width, height=height)
    faces, hands = detect(rgb, min_confidence=settings.min_confidence, tiles=settings.tiles,
                          models_dir=settings.models_dir, max_side=settings.max_side)
    record["faces"] = [f.to_json() for f in faces]
    record["hands"] = [h.to_json() for h in hands]
    record["status"] = "ok" if faces or hands else "no_people"
    for kind, found, path in (("face", faces, task.mask_face), ("hand", hands, task.mask_hand)):
        if path.exists() and not is_our_mask(path):
            from PIL import Image

            try:
                with Image.open(path) as im:
                    size = im.size
            except Exception as err:
                size, bad = None, f"{type(err).__name__}: {err}"
            if size != (width, height):
                record["status"] = "error"
                notes.append(f"user {kind} mask {_relative(path, task.out)} is "
                             + (f"{size[0]}x{size[1]}" if size else f"unreadable ({bad})")
                             + f", the image is {width}x{height}: fix or remove it")
                continue
            notes.append(f"kept the user's {kind} mask {_relative(path, task.out)}")
        else:
            mask = boxes_mask([d.box for d in found], (height, width), padding=settings.padding,
                              dilation=settings.dilation, feather=settings.feather)
            write_mask(path, mask)
        record[f"mask_{kind}"] = _relative(path, task.out)
    add_condition(record, task, settings, rgb, notes)
    if record["status"] == "error":
        record["mask_face"] = record["mask_hand"] = record["condition"] = None
    record["reason"] = "; ".join(notes) or None
    return record


def add_condition(record: dict, task: ImageTask, settings: Settings, rgb, notes: list) -> None:
    """The record's ``condition``: the user's ``<stem>_condition.png`` as it is, else (``--pose``)
    our pose render, tagged like our masks; ``pose`` counts what was drawn."""
    path = task.condition
    if path is None:
        return
    if path.exists() and not is_our_mask(path):
        record["condition"] = _relative(path, task.out)
        notes.append(f"kept the user's condition image {record['condition']}")
    elif settings.pose:
        from core.masks.pose import detect_pose, render_pose

        pose = detect_pose(rgb, min_confidence=settings.min_confidence, models_dir=settings.models_dir)
        write_mask(path, render_pose(pose))
        record["condition"], record["pose"] = _relative(path, task.out), pose.to_json()


# ---- the folder ---------------------------------------------------------------------------------
def list_files(root: Path, out: Path) -> tuple[list[Path], list[Path]]:
    """(images, ignored): image files by suffix, recursively, sorted; hidden files, captions,
    our metadata and the masks folders (the output's and the folder's own) are left out; other
    files are 'ignored'."""
    images, ignored = [], []
    skip_dirs = {(out / MASKS).resolve(), (root / MASKS).resolve()}  # masks, conditions: not photos
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skip_dirs)
        for name in sorted(files):
            path = here / name
            suffix = path.suffix.lower()
            if name.startswith(".") or suffix in SIDE_FILES or name == METADATA:
                continue
            (images if suffix in IMAGE_SUFFIXES else ignored).append(path)
    return images, ignored


def make_tasks(root: Path, out: Path, images: list[Path]) -> list[ImageTask]:
    stems = Counter((p.parent, p.stem) for p in images)
    tasks = []
    for path in images:
        rel = path.relative_to(root)
        # "a.jpg" and "a.png" side by side must not share masks
        base = rel.with_suffix("") if stems[(path.parent, path.stem)] == 1 else rel.with_name(
            f"{path.stem}_{path.suffix.lstrip('.').lower()}")
        caption = path.with_suffix(".txt")
        side = {kind: _users_or_ours(root / MASKS / f"{base}_{kind}.png", out / MASKS / f"{base}_{kind}.png")
                for kind in ("face", "hand", "condition")}
        tasks.append(ImageTask(
            image=path.resolve(), key=_relative(path.resolve(), out.resolve()),
            caption=caption if caption.is_file() else None,
            mask_face=side["face"], mask_hand=side["hand"], out=out.resolve(), condition=side["condition"],
        ))
    return tasks


def _users_or_ours(own: Path, target: Path) -> Path:
    """Where an image's mask or condition is: ``target`` in the output's masks/, unless the output
    goes elsewhere (``--out``) and holds none while the folder's own masks/ holds the user's file
    (the training nodes annotate into their job folder: a user's condition there still counts)."""
    own, target = own.resolve(), target.resolve()
    if own != target and not target.exists() and own.is_file() and not is_our_mask(own):
        return own
    return target


def is_done(record: dict | None, out: Path, retry_errors: bool, pose: bool = False) -> bool:
    if record is None:
        return False
    if record.get("status", "ok") == "error":
        return not retry_errors
    if pose and not record.get("condition"):
        return False  # annotated before --pose
    masks = [record.get(k) for k in ("mask_face", "mask_hand", "condition")]
    return all((out / m).is_file() for m in masks if m)  # a deleted mask is made again


def _results(tasks: list[ImageTask], settings: Settings, workers: int):
    """Yield records as images finish: in this process or in a pool of ``workers``."""
    if workers <= 1:
        for task in tasks:
            yield annotate_one(task, settings)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # forkserver: workers start clean (no threads inherited from a caller that loaded torch) and
    # build their own detectors; mediapipe (1 s to import) is imported once, in the server.
    # Windows has no forkserver: spawn there.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["mediapipe.tasks.python.vision", "core.masks", "trainers.annotate"])
    else:
        context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(annotate_one, task, settings): task for task in tasks}
        try:
            for future in as_completed(futures):
                try:
                    yield future.result()
                except Exception as err:  # a worker died on this image: record it, go on
                    task = futures[future]
                    yield {"image": task.key, "text": "", "width": None, "height": None, "status": "error",
                           "reason": f"annotation failed: {type(err).__name__}: {err}", "faces": [], "hands": [],
                           "mask_face": None, "mask_hand": None}
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def default_workers() -> int:
    """One pool process per core, the cores shared among the launcher's processes on this machine."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def run(args: argparse.Namespace) -> int:
    from core.masks import MediapipeMissing, ModelFilesMissing, require_mediapipe, resolve_model_files

    root = args.dir
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    out = args.out or root
    out.mkdir(parents=True, exist_ok=True)
    if not 0 < args.min_confidence <= 1 or args.padding < 0 or args.dilation < 0 or args.feather < 0:
        print("error: --min-confidence must be in (0, 1]; --padding, --dilation, --feather >= 0", file=sys.stderr)
        return 2
    try:
        require_mediapipe()  # else every worker would record each image as an error
        files = resolve_model_files(args.models_dir)
        if args.pose:
            from core.masks.pose import resolve_pose_file

            resolve_pose_file(args.models_dir)
    except (MediapipeMissing, ModelFilesMissing) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = Settings(min_confidence=args.min_confidence, padding=args.padding, dilation=args.dilation,
                        feather=args.feather, tiles=not args.no_tiles, max_side=args.max_side or None,
                        models_dir=str(args.models_dir) if args.models_dir else None, pose=args.pose)

    images, ignored = list_files(root, out)
    meta_path = out / METADATA
    share = shards.Share.of(args.shard)
    store = shards.ShardedRecords(meta_path, share, key=lambda r: r["image"],
                                  finished=lambda r: r.get("status", "ok") in DONE_STATUS)
    tasks = make_tasks(root, out, images)
    keys = [task.key for task in tasks]
    try:
        records = store.load()
    except (JsonlError, shards.ShardError) as err:
        print(f"error: {err}; fix or delete that line (or the file, to annotate everything again)", file=sys.stderr)
        return 2
    todo = [(k, task.key) for k, task in enumerate(tasks)
            if not is_done(records.get(task.key), out.resolve(), args.retry_errors, args.pose)]
    start = time.perf_counter()
    try:
        if not args.merge:
            if share.reporter:
                print(f"annotate {root}: {len(tasks)} images, {len(tasks) - len(todo)} already done, {len(todo)} to do"
                      + (f" ({share.describe()} of them)" if share.count > 1 else "")
                      + f" (models: {files.origin})", flush=True)

            def annotated(positions):
                workers = max(1, min(args.workers or default_workers(), len(positions) or 1))
                return _results([tasks[k] for k in positions], settings, workers)

            shards.work_share(store, todo, annotated, "annotate", "img", on_record=note)
            records = store.gathered()
            if records is None:
                return 0
        gone = sorted(set(records) - set(keys))
        for key in gone:  # the image was deleted or moved: its record would point at nothing
            del records[key]
        if gone:
            print(f"  dropped {len(gone)} record(s) of images no longer there (e.g. {gone[0]})")
        store.check_complete(records, keys)
        store.merge([records[key] for key in sorted(records)])
    except shards.ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    counts = Counter(records[key]["status"] for _, key in todo)
    print(f"done in {elapsed:.1f} s: ok {counts['ok']}, no_people {counts['no_people']}, error {counts['error']}, "
          f"skipped as done {len(tasks) - len(todo)}, not images {len(ignored)}")
    if ignored:
        shown = ", ".join(_relative(p, root) for p in ignored[:5])
        print(f"  not images (ignored by suffix): {shown}{' ...' if len(ignored) > 5 else ''}")
    print(f"  {meta_path}")
    return 0


def note(record: dict) -> None:
    """Say what went wrong with an image, or what was kept of the user's, as it finishes."""
    from tqdm.auto import tqdm

    if record["status"] == "error":
        tqdm.write(f"  error {record['image']}: {record['reason']}")
    elif record["reason"]:
        tqdm.write(f"  note  {record['image']}: {record['reason']}")
