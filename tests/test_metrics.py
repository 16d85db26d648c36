"""core.metrics: the paper's confidence means, detection rates and per-image details."""
from __future__ import annotations

import numpy as np
import pytest

from core.metrics import ImageScores, confidence_metrics, scores_from_records, summarize


def test_means_and_rates_by_hand():
    report = summarize([
        ImageScores("a", (0.9, 0.7), (1.0,)),
        ImageScores("b", (0.8,), ()),
        ImageScores("c", (), ()),
        ImageScores("d", (), (0.6, 0.8)),
    ])
    assert report.images == 4 and report.faces == 3 and report.hands == 3
    assert report.face_confidence == pytest.approx(0.8) and report.face_detection_rate == 0.5
    assert report.hand_confidence == pytest.approx(0.8) and report.hand_detection_rate == 0.5
    assert [row.image for row in report.per_image] == ["a", "b", "c", "d"]
    assert "Face Confi. 0.8000" in report.summary() and report.to_json()["per_image"][0]["image"] == "a"


def test_hiding_hands_does_not_pay():
    """Mean over detected hands alone rewards a model whose hands vanish; the rate exposes it."""
    honest = summarize([ImageScores(str(i), (0.9,), (0.95,) if i < 9 else (0.6,)) for i in range(10)])
    hider = summarize([ImageScores(str(i), (0.9,), (0.99,) if i == 0 else ()) for i in range(10)])
    assert hider.hand_confidence > honest.hand_confidence
    assert hider.hand_detection_rate == 0.1 < honest.hand_detection_rate == 1.0
    empty = summarize([])
    assert empty.face_confidence is None and empty.face_detection_rate == 0.0


def test_on_real_photos(sample_photos):
    blank = np.full((256, 256, 3), 200, np.uint8)
    report = confidence_metrics([sample_photos[1], blank], tiles=True)
    assert report.images == 2 and report.face_detection_rate == 0.5 and report.hand_detection_rate == 0.5
    assert report.faces == 3 and report.hands >= 2 and 0.5 < report.face_confidence <= 1.0
    assert report.per_image[0].image.endswith("sample2.jpg") and report.per_image[1].face_scores == ()
    again = confidence_metrics([sample_photos[1], blank], tiles=True)
    assert again == report  # no state carried from one image to the next
    single = confidence_metrics([blank, sample_photos[1]], tiles=True)
    assert single.per_image[1].face_scores == report.per_image[0].face_scores


def test_from_annotation_records():
    rows = [
        {"image": "a.jpg", "status": "ok", "faces": [{"box": [0, 0, 1, 1], "score": 0.5}],
         "hands": [{"box": [0, 0, 1, 1], "score": 0.9, "handedness": "Left", "handedness_score": 0.9}]},
        {"image": "b.jpg", "status": "no_people", "faces": [], "hands": []},
        {"image": "c.jpg", "status": "error", "faces": [], "hands": []},
    ]
    report = scores_from_records(rows)
    assert report.images == 2 and report.face_confidence == 0.5 and report.hand_detection_rate == 0.5
