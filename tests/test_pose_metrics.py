"""Pose alignment ("Mean Diff"): hand-checked values on synthetic poses, and real detection."""
import math

import numpy as np
import pytest

from core.masks.pose import Person
from core.pose_metrics import image_pose_alignment, pose_alignment


def person(offset=(0.0, 0.0), hidden=()):
    rng = np.random.default_rng(0)
    keypoints = (rng.random((18, 2)) * 100 + np.array(offset)).astype(np.float32)
    visible = np.ones(18, bool)
    visible[list(hidden)] = False
    return Person(keypoints, visible, np.zeros((0, 2), np.float32))


def test_identical_poses_score_zero_and_a_shift_scores_its_length_over_the_diagonal():
    size = (300, 400)  # diagonal 500
    assert pose_alignment([person()], [person()], size).mean_diff == 0.0
    shifted = pose_alignment([person((30.0, 40.0))], [person()], size)
    assert shifted.mean_diff == pytest.approx(50.0 / 500.0, rel=1e-5)
    assert (shifted.matched, shifted.missed, shifted.keypoints) == (1, 0, 18)


def test_people_are_matched_whatever_their_order_and_only_shared_keypoints_count():
    a, b = person(), person((1000.0, 0.0))
    size = (2000, 0)
    order1 = pose_alignment([a, b], [b, a], size)
    order2 = pose_alignment([b, a], [b, a], size)
    assert order1.mean_diff == order2.mean_diff == 0.0
    partly = pose_alignment([person((10.0, 0.0), hidden=range(9))], [person()], (100, 0))
    assert partly.keypoints == 9 and partly.mean_diff == pytest.approx(0.1, rel=1e-5)


def test_a_missing_person_is_counted_not_averaged():
    result = pose_alignment([person()], [person(), person((500.0, 0.0))], (300, 400))
    assert (result.matched, result.missed) == (1, 1) and result.mean_diff == 0.0
    nothing = pose_alignment([], [person()], (300, 400))
    assert nothing.missed == 1 and math.isnan(nothing.mean_diff)


def test_real_photo_against_itself_and_a_shifted_copy(sample_photos):
    from core.masks import load_rgb
    from core.masks.pose import detect_pose

    rgb = load_rgb(sample_photos[1])
    pose = detect_pose(rgb, hands=False)
    assert pose.people
    same = image_pose_alignment(rgb, pose)
    assert same.missed == 0 and same.mean_diff < 1e-3
    shift = 64
    moved = np.zeros_like(rgb)
    moved[:, shift:] = rgb[:, :-shift]
    result = image_pose_alignment(moved, pose)
    expected = shift / math.hypot(rgb.shape[1], rgb.shape[0])
    assert result.matched >= 1 and abs(result.mean_diff - expected) < 0.5 * expected
