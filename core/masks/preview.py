"""The preview picture: the photo with a colored mask overlay, boxes, scores and hand landmarks."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .types import Face, Hand

FACE_COLOR = (255, 140, 0)  # orange
HAND_COLOR = (0, 200, 255)  # cyan


def draw_preview(image: np.ndarray, faces: Sequence[Face], hands: Sequence[Hand],
                 face_mask: np.ndarray | None = None, hand_mask: np.ndarray | None = None,
                 opacity: float = 0.45) -> np.ndarray:
    """HxWx3 uint8 RGB: ``image`` tinted by the masks, each detection boxed with its score
    (hands: handedness and landmarks too)."""
    import cv2

    out = image.astype(np.float32)
    for mask, color in ((face_mask, FACE_COLOR), (hand_mask, HAND_COLOR)):
        if mask is not None:
            alpha = (np.clip(mask, 0, 1) * opacity)[..., None]
            out = out * (1 - alpha) + np.array(color, np.float32) * alpha
    out = np.ascontiguousarray(out.round().astype(np.uint8))
    side = max(out.shape[:2])
    thick = max(1, side // 400)
    font = max(0.4, side / 1600)
    labels = [(f.box, f"face {f.score:.2f}", FACE_COLOR) for f in faces]
    labels += [(h.box, f"{h.handedness[:1]} hand {h.handedness_score:.2f}", HAND_COLOR) for h in hands]
    for box, text, color in labels:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), color, thick)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, thick)
        ty = y0 - 4 if y0 - th - base - 4 >= 0 else min(out.shape[0] - 1, y1 + th + 4)
        cv2.rectangle(out, (x0, ty - th - base), (x0 + tw, ty + base), color, -1)
        cv2.putText(out, text, (x0, ty), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), thick, cv2.LINE_AA)
    for hand in hands:
        for x, y in hand.landmarks:
            cv2.circle(out, (int(round(x)), int(round(y))), thick + 1, HAND_COLOR, -1)
    return out
