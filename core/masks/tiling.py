"""Overlapping tiles and duplicate merging, for detectors with a small input.

The face model that ships offline sees a 128-px input, so on a group photo most faces are a few
input pixels wide. Running it on the whole image *and* on overlapping tiles, mapping the tile
boxes back and merging duplicates finds them. With half overlap, any object up to half a tile
wide lies wholly inside some tile; bigger ones are the whole-image pass's job.
"""
from __future__ import annotations

import numpy as np

Window = tuple[int, int, int, int]  # x0, y0, x1, y1


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # last tile flush with the edge
    return starts


def tile_windows(height: int, width: int, tile: int, overlap: float = 0.5) -> list[Window]:
    """Windows of ``tile`` px covering the image with the given overlap; [] when the image
    fits in one tile (the whole-image pass covers it)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if height <= tile and width <= tile:
        return []
    stride = max(1, int(round(tile * (1.0 - overlap))))
    return [(x, y, min(x + tile, width), min(y + tile, height))
            for y in _starts(height, tile, stride) for x in _starts(width, tile, stride)]


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
