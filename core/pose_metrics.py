"""Pose alignment, the FairHuman paper's "Mean Diff" column: how far the pose detected in a
generated image lies from the pose of its condition.

Each condition person is matched to the nearest unused generated person (by the mean distance
of the keypoints both show); the score is the mean distance of the matched, both-visible
keypoints divided by the image diagonal, so it does not depend on the resolution. Condition
people with no generated match are counted (``missed``), not folded into the mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PoseAlignment:
    mean_diff: float  # NaN when no keypoint could be compared
    matched: int
    missed: int
    keypoints: int  # compared keypoints


def _distance(a, b) -> tuple[float, int]:
    both = a.visible & b.visible
    if not both.any():
        return float("inf"), 0
    return float(np.linalg.norm(a.keypoints[both] - b.keypoints[both], axis=1).mean()), int(both.sum())


def pose_alignment(generated, condition, size: tuple[int, int]) -> PoseAlignment:
    """``generated``/``condition``: sequences of people with ``keypoints`` (K, 2) pixels and
    ``visible`` (K,) bool (``core.masks.pose.Person``); ``size`` (width, height)."""
    diagonal = float(np.hypot(*size))
    pairs = sorted(((_distance(c, g), ci, gi) for ci, c in enumerate(condition) for gi, g in enumerate(generated)),
                   key=lambda item: item[0][0])
    used_c, used_g, total, count = set(), set(), 0.0, 0
    for (dist, n), ci, gi in pairs:  # greedy: closest pairs first
        if ci in used_c or gi in used_g or n == 0:
            continue
        used_c.add(ci)
        used_g.add(gi)
        total += dist * n
        count += n
    mean = total / count / diagonal if count else float("nan")
    return PoseAlignment(mean_diff=mean, matched=len(used_c), missed=len(condition) - len(used_c), keypoints=count)


def image_pose_alignment(image, condition_pose, **detect_options) -> PoseAlignment:
    """Detect the pose in a generated ``image`` and align it with ``condition_pose`` (a
    ``core.masks.pose.Pose`` of the same size, e.g. detected on the photo the condition came from)."""
    from .masks.pose import detect_pose

    found = detect_pose(image, hands=False, **detect_options)
    if found.size != condition_pose.size:
        raise ValueError(f"generated image is {found.size[0]}x{found.size[1]}, the condition "
                         f"{condition_pose.size[0]}x{condition_pose.size[1]}: compare at the same size")
    return pose_alignment(found.people, condition_pose.people, found.size)
