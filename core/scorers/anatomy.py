"""The built-in, offline ``anatomy`` scorer: rewards faces and hands that a detector finds with
confidence and whose hand landmarks have a plausible geometry — the fine anatomical detail that
HG-DPO's paper notes PickScore misses (its limitation B.2).

score = Σ_faces detection score + Σ_hands handedness confidence × landmark plausibility
        + soft_weight × the best face confidence of a whole-image pass at a low threshold

The last term breaks ties among images with no confident detection — the usual case for a
young or small model, whose samples would otherwise all score 0 and give pairs with no
preference in them. At 0.1 it stays below what one confident face (≥ 0.5) adds.
"""
from __future__ import annotations

import numpy as np

FINGERS = ((1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16), (17, 18, 19, 20))


def landmark_plausibility(landmarks: np.ndarray) -> float:
    """Fraction of fingers (of 5) whose three segments are each 10-100 % of the palm length
    (wrist to middle-finger knuckle) and whose whole length is at most twice the palm's."""
    pts = np.asarray(landmarks, dtype=np.float64)
    palm = np.linalg.norm(pts[9] - pts[0])
    if palm <= 1e-6:
        return 0.0
    good = 0
    for finger in FINGERS:
        segments = np.linalg.norm(np.diff(pts[list(finger)], axis=0), axis=1) / palm
        if np.all((segments >= 0.1) & (segments <= 1.0)) and segments.sum() <= 2.0:
            good += 1
    return good / len(FINGERS)


class AnatomyScorer:
    def __init__(self, min_confidence: float = 0.5, tiles: bool = True, models_dir=None,
                 soft_weight: float = 0.1, soft_confidence: float = 0.05):
        self.min_confidence, self.tiles, self.models_dir = min_confidence, tiles, models_dir
        self.soft_weight, self.soft_confidence = soft_weight, soft_confidence

    def score_one(self, image) -> float:
        from ..masks import as_rgb_array, detect

        rgb = as_rgb_array(image)
        faces, hands = detect(rgb, min_confidence=self.min_confidence, tiles=self.tiles, models_dir=self.models_dir)
        score = (sum(f.score for f in faces)
                 + sum(h.handedness_score * landmark_plausibility(h.landmarks) for h in hands))
        if self.soft_weight:
            weak, _ = detect(rgb, min_confidence=self.soft_confidence, tiles=False, hands=False,
                             models_dir=self.models_dir)
            score += self.soft_weight * max((f.score for f in weak), default=0.0)
        return float(score)

    def score(self, images, prompts=None) -> list[float]:
        return [self.score_one(image) for image in images]
