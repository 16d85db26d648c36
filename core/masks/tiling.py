"""Overlapping tiles and duplicate merging, for detectors with a small input.

The face model that ships offline sees a 128-px input, so on a group photo most faces are a few
input pixels wide. Running it on the whole image *and* on overlapping tiles, mapping the tile
boxes back and merging duplicates finds them. With half overlap, any object up to half a tile
wide lies wholly inside some tile; bigger ones are the whole-image pass's job.
"""
from __future__ import annotations

import math

import numpy as np

Window = tuple[int, int, int, int]  # x0, y0, x1, y1


def _spans(length: int, tile: int, stride: int, slack: float) -> list[tuple[int, int]]:
    """Evenly spaced (start, end) spans of ``tile`` px, at most ``stride`` apart, covering
    ``length``; one full-length span when the length is within ``slack`` of a tile (splitting a
    683-px side into two 640-px rows would run the detector twice on nearly the same pixels)."""
    if length <= tile * (1.0 + slack):
        return [(0, length)]
    count = math.ceil((length - tile) / stride) + 1
    return [(round(i * (length - tile) / (count - 1)), round(i * (length - tile) / (count - 1)) + tile)
            for i in range(count)]


def tile_windows(height: int, width: int, tile: int, overlap: float = 0.5, slack: float = 0.25) -> list[Window]:
    """Windows of about ``tile`` px covering the image, neighbours overlapping by at least
    ``overlap`` of a tile; [] when the image is about one tile (the whole-image pass covers it)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if height <= tile * (1.0 + slack) and width <= tile * (1.0 + slack):
        return []
    stride = max(1, int(tile * (1.0 - overlap)))
    return [(x0, y0, x1, y1) for y0, y1 in _spans(height, tile, stride, slack)
            for x0, x1 in _spans(width, tile, stride, slack)]


def touches_inner_edge(box, window: Window, height: int, width: int, margin: float = 2.0) -> bool:
    """Whether a box found in ``window`` touches a window edge that is not an image edge: the
    object is probably cut off there and seen whole by a neighbouring tile."""
    x0, y0, x1, y1 = box
    wx0, wy0, wx1, wy1 = window
    return bool((wx0 > 0 and x0 <= wx0 + margin) or (wy0 > 0 and y0 <= wy0 + margin)
                or (wx1 < width and x1 >= wx1 - margin) or (wy1 < height and y1 >= wy1 - margin))


def overlaps(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise IoU and intersection over the smaller box's area, for (N, 4) boxes."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = area[:, None] + area[None, :] - inter
    smaller = np.minimum(area[:, None], area[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
        iomin = np.where(smaller > 0, inter / smaller, 0.0)
    return iou, iomin


def merge_duplicates(boxes, scores, partial=None, *, iou: float = 0.4, containment: float = 0.7) -> list[int]:
    """Greedy non-maximum suppression; returns the kept indices in priority order.

    Whole views go first (``partial`` marks boxes cut by a tile edge), then higher scores. A box
    is a duplicate of a kept one when their IoU exceeds ``iou`` or when most of the smaller box
    lies inside the other (``containment``): a tile's tight box and the whole image's loose box of
    the same face overlap by IoU ~0.45 only.
    """
    n = len(scores)
    if n == 0:
        return []
    partial = np.zeros(n, bool) if partial is None else np.asarray(partial, bool)
    order = sorted(range(n), key=lambda i: (bool(partial[i]), -float(scores[i]), i))
    iou_m, iomin_m = overlaps(np.asarray(boxes))
    kept: list[int] = []
    for i in order:
        if all(iou_m[i, k] <= iou and iomin_m[i, k] <= containment for k in kept):
            kept.append(i)
    return kept
