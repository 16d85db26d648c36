"""The annotated dataset (``metadata.jsonl`` + face/hand mask PNGs) as training batches.

Augmentation is aligned by construction: the image and its two masks are stacked into one
5-channel tensor and resized, cropped and flipped *together*, so a mask can never drift from
its image (the reference code draws the flip and crop independently per tensor). Masks are
brought to the latent grid with ``core.masks.to_latent`` (area/max pooling), so a hand smaller
than one latent cell still counts.

Everything random is a pure function of (seed, epoch, index), and the batch of an optimizer step
is a pure function of (seed, step): a resumed run sees exactly the batches and augmentations
that an uninterrupted run would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

METADATA = "metadata.jsonl"
USABLE_STATUS = ("ok", "no_people")


@dataclass(frozen=True)
class Record:
    image: Path
    text: str
    mask_face: Path | None
    mask_hand: Path | None
    width: int
    height: int
    condition: Path | None = None  # a ControlNet's condition image (annotate --pose, or the user's)


def read_records(data_dir: str | Path) -> list[Record]:
    """Usable records of an annotated folder; a clear error when there are none."""
    data_dir = Path(data_dir)
    meta = data_dir / METADATA
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta} not found: annotate the folder first with `python -m trainers annotate {data_dir}`"
        )
    from core.fileio import read_jsonl

    records = []
    for row in read_jsonl(meta):
        if row.get("status", "ok") not in USABLE_STATUS:
            continue

        def _path(key):
            value = row.get(key)
            return (data_dir / value) if value else None

        records.append(Record(
            image=data_dir / row["image"], text=row.get("text") or "",
            mask_face=_path("mask_face"), mask_hand=_path("mask_hand"),
            width=int(row.get("width") or 0), height=int(row.get("height") or 0),
            condition=_path("condition"),
        ))
    if not records:
        raise ValueError(f"{meta} lists no usable image (status ok or no_people)")
    return records


def unreadable_files(paths: list[Path]) -> list[str]:
    """``"name (why)"`` for each path that is missing or does not open as an image."""
    from PIL import Image, UnidentifiedImageError

    bad = []
    for path in dict.fromkeys(paths):
        if not path.is_file():
            bad.append(f"{path.name} (missing)")
            continue
        try:
            with Image.open(path) as im:
                im.size  # the header: enough to know it is an image PIL reads
        except (OSError, UnidentifiedImageError) as err:
            bad.append(f"{path.name} ({type(err).__name__})")
    return bad


def refuse_unreadable(paths: list[Path], listing: Path, fix: str) -> None:
    bad = unreadable_files(paths)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{listing} references {len(bad)} file(s) that are missing or unreadable: {shown}; {fix}")


def check_records(data_dir) -> list[Record]:
    """The usable records, every image and mask of them present and readable."""
    records = read_records(data_dir)
    paths = [r.image for r in records] + [m for r in records for m in (r.mask_face, r.mask_hand) if m]
    refuse_unreadable(paths, Path(data_dir) / METADATA,
                      f"restore them, or annotate the folder again (`python -m trainers annotate {data_dir}`)")
    return records


def buckets(resolution: int, multiple: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution² pixels, sides multiples of ``multiple``."""
    area = resolution * resolution
    found = {(resolution, resolution)}
    width = multiple
    while width <= resolution * max_ratio:
        height = int(round(area / width / multiple)) * multiple
        if height >= multiple and max(width / height, height / width) <= max_ratio:
            found.add((width, height))
        width += multiple
    return sorted(found)


def nearest_bucket(width: int, height: int, options: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(options, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - ratio), -wh[0] * wh[1]))


def _load_rgb(path: Path) -> np.ndarray:
    from core.masks import load_rgb  # EXIF orientation applied, as annotate and ComfyUI do

    return np.array(load_rgb(path))


def _load_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    if path is None or not path.is_file():
        return np.zeros(shape, np.float32)
    from PIL import Image

    with Image.open(path) as im:
        mask = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if mask.shape != shape:
        raise ValueError(f"mask {path} is {mask.shape[::-1]}, its image is {shape[::-1]}")
    return mask


def _load_condition(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """A condition image as (H,W,3) float in [0, 1] at its photo's size (a user's image of
    another size is resized to it)."""
    from PIL import Image

    if path is None or not path.is_file():
        raise FileNotFoundError(f"condition image {path} not found: run `python -m trainers annotate DIR --pose`, "
                                "or put your own as masks/<image stem>_condition.png and annotate again")
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (shape[1], shape[0]):
            im = im.resize((shape[1], shape[0]), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0


def aligned_transform(
    stack: torch.Tensor, bucket: tuple[int, int], generator: torch.Generator, *, random_crop: bool, flip_p: float
):
    """Resize a (C,H,W) stack to cover ``bucket``, crop and maybe flip it — every channel alike.

    Returns (stack, crop_top, crop_left, flipped); crop offsets are in resized pixels (SDXL
    conditioning).
    """
    _, height, width = stack.shape
    target_w, target_h = bucket
    scale = max(target_w / width, target_h / height)
    new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    resized = F.interpolate(stack[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    draws = torch.rand(3, generator=generator)
    if random_crop:
        top = int(draws[0] * (new_h - target_h + 1))
        left = int(draws[1] * (new_w - target_w + 1))
    else:
        top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    out = resized[:, top: top + target_h, left: left + target_w]
    flipped = bool(draws[2] < flip_p)
    if flipped:
        out = out.flip(-1)
    return out, top, left, flipped


class RegionDataset(torch.utils.data.Dataset):
    """Images with face and hand masks, augmented and bucketed, for FairHuman; with
    ``conditions`` also each record's condition image, in the same stack (so in the same crop)."""

    def __init__(self, data_dir, *, resolution: int, seed: int, random_crop: bool = True,
                 flip_p: float = 0.5, bucketing: bool = True, latent_factor: int = 8,
                 conditions: bool = False):
        self.records = read_records(data_dir)
        self.conditions = conditions
        self.resolution, self.seed = resolution, seed
        self.random_crop, self.flip_p, self.latent_factor = random_crop, flip_p, latent_factor
        options = buckets(resolution) if bucketing else [(resolution, resolution)]
        self.bucket_of = []
        for rec in self.records:
            w, h = rec.width, rec.height
            if not (w and h):
                from PIL import Image

                with Image.open(rec.image) as im:
                    w, h = im.size
            self.bucket_of.append(nearest_bucket(w, h, options))

    def __len__(self) -> int:
        return len(self.records)

    def item(self, index: int, epoch: int) -> dict:
        from core.masks import to_latent

        rec = self.records[index]
        image = _load_rgb(rec.image)
        shape = image.shape[:2]
        stack = torch.cat([
            torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0,
            torch.from_numpy(_load_mask(rec.mask_face, shape))[None],
            torch.from_numpy(_load_mask(rec.mask_hand, shape))[None],
            *([torch.from_numpy(_load_condition(rec.condition, shape)).permute(2, 0, 1)] if self.conditions else []),
        ])
        generator = torch.Generator().manual_seed(hash((self.seed, epoch, index)) & 0x7FFFFFFF)
        bucket = self.bucket_of[index]
        out, top, left, flipped = aligned_transform(stack, bucket, generator, random_crop=self.random_crop,
                                                    flip_p=self.flip_p)
        latent_hw = (bucket[1] // self.latent_factor, bucket[0] // self.latent_factor)
        masks = out[3:5].clamp(0, 1)
        latent_masks = torch.stack([torch.as_tensor(to_latent(m, latent_hw)).float() for m in masks])
        return {
            "pixels": out[:3].clamp(-1, 1),
            "masks": masks,
            "latent_masks": latent_masks,  # (2, h, w): face, hand
            "text": rec.text,
            # SDXL micro-conditioning: original size, crop top-left, target size (h, w order)
            "time_ids": torch.tensor([shape[0], shape[1], top, left, bucket[1], bucket[0]], dtype=torch.float32),
            "index": index,
            # what the pixels are a function of: the key of the latent cache (no random crop)
            "view": f"{index}-{bucket[0]}x{bucket[1]}-{'flip' if flipped else 'orig'}",
            **({"condition": out[5:8].clamp(0, 1)} if self.conditions else {}),
        }


class StepBatches:
    """Which dataset items form the micro-batches of each optimizer step.

    Each epoch is a seeded permutation cut into same-bucket batches; steps walk through epochs.
    The mapping is a pure function of (seed, step), which is what makes resume exact.
    """

    def __init__(self, bucket_of: list, batch_size: int, seed: int):
        self.bucket_of, self.batch_size, self.seed = bucket_of, batch_size, seed
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            order = torch.randperm(len(self.bucket_of), generator=generator).tolist()
            groups: dict = {}
            for i in order:
                groups.setdefault(self.bucket_of[i], []).append(i)
            batches = []
            for members in groups.values():
                # short last batches repeat items so every batch has the same size
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start: start + self.batch_size]
                    while len(chunk) < self.batch_size:
                        chunk.append(members[len(chunk) % len(members)])
                    batches.append(chunk)
            perm = torch.randperm(len(batches), generator=generator).tolist()
            self._epochs[epoch] = [batches[i] for i in perm]
        return self._epochs[epoch]

    def batch(self, number: int) -> tuple[int, list[int]]:
        """(epoch, indices) of the ``number``-th batch of the run."""
        epoch = 0
        while True:
            batches = self.epoch_batches(epoch)
            if number < len(batches):
                return epoch, batches[number]
            number -= len(batches)
            epoch += 1


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
