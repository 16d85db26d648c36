"""The detection records returned by ``detect``: boxes in pixels of the input image."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels; x1/y1 exclusive edges


@dataclass(frozen=True)
class Face:
    box: Box
    score: float  # mediapipe FaceDetector's detection score

    def to_json(self) -> dict:
        return {"box": [round(v, 2) for v in self.box], "score": round(self.score, 4)}


@dataclass(frozen=True)
class Hand:
    box: Box  # the box around the 21 landmarks
    # mediapipe's Tasks API returns no palm-detection or presence score per hand (both are only
    # thresholds, set to min_confidence); the handedness probability is the one per-hand number
    # it gives, so it is also the hand's score.
    score: float
    handedness: str  # "Left" / "Right", as mediapipe labels it
    handedness_score: float
    landmarks: np.ndarray = field(compare=False, repr=False)  # (21, 2) x, y in pixels, read-only

    def to_json(self) -> dict:
        return {"box": [round(v, 2) for v in self.box], "score": round(self.score, 4),
                "handedness": self.handedness, "handedness_score": round(self.handedness_score, 4)}
