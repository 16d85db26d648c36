"""Small datasets with ControlNet conditions for the ControlNet trainer tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from train_helpers import make_region_dataset


def stick_figure(size: int, seed: int) -> np.ndarray:
    """A few coloured strokes on black, like an OpenPose render."""
    import cv2

    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    for _ in range(6):
        a, b = rng.integers(4, size - 4, (2, 2)).tolist()
        cv2.line(image, tuple(a), tuple(b), tuple(int(c) for c in rng.integers(0, 256, 3)), 2)
    return image


def make_conditioned_dataset(folder: Path, count: int = 4, size: int = 64) -> Path:
    """``make_region_dataset`` plus a condition image per record (masks/<stem>_condition.png)."""
    data = make_region_dataset(folder, count=count, size=size)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        Image.fromarray(stick_figure(size, i)).save(data / "masks" / f"img{i}_condition.png")
        row["condition"] = f"masks/img{i}_condition.png"
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data
