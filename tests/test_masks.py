"""core.masks on real photos with real mediapipe: detection, tiling, masks, latent masks."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from core.masks import Face, boxes_mask, detect, region_masks, to_latent
from core.masks import detection as detection_module
from core.masks.tiling import merge_duplicates, overlaps, tile_windows


def _assert_clean(boxes, height, width):
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    if len(boxes) > 1:
        iou, _ = overlaps(np.array(boxes))
        np.fill_diagonal(iou, 0)
        assert iou.max() <= 0.5


@pytest.mark.parametrize("name, min_faces, max_faces, min_hands", [
    ("sample2.jpg", 3, 3, 2),
    ("sample4.jpg", 4, 5, 2),
])
def test_group_photos(sample_detections, name, min_faces, max_faces, min_hands):
    rgb, faces, hands = sample_detections[name]
    height, width = rgb.shape[:2]
    assert min_faces <= len(faces) <= max_faces, [f.score for f in faces]
    assert len(hands) >= min_hands
    for kind in (faces, hands):
        _assert_clean([d.box for d in kind], height, width)
    for face in faces:
        assert 0.5 <= face.score <= 1.0
    for hand in hands:
        assert hand.handedness in ("Left", "Right") and 0.5 <= hand.handedness_score <= 1.0
        assert hand.landmarks.shape == (21, 2)
        x0, y0, x1, y1 = hand.box  # the box is the landmarks' box
        assert np.allclose(hand.landmarks.min(0), [x0, y0], atol=1) and np.allclose(hand.landmarks.max(0), [x1, y1], atol=1)

    face_mask, hand_mask = region_masks((faces, hands), size=(height, width))
    for mask, found in ((face_mask, faces), (hand_mask, hands)):
        assert mask.dtype == np.float32 and mask.shape == (height, width)
        assert mask.min() >= 0 and mask.max() <= 1
        for d in found:  # every pixel of every box is covered
            x0, y0, x1, y1 = (int(v) for v in d.box)
            assert mask[y0:int(np.ceil(d.box[3])), x0:int(np.ceil(d.box[2]))].min() == 1.0


def test_same_input_same_result(sample_detections):
    rgb, faces, hands = sample_detections["sample2.jpg"]
    again_faces, again_hands = detect(rgb.copy())
    assert again_faces == faces and again_hands == hands
    assert all(np.array_equal(a.landmarks, b.landmarks) for a, b in zip(again_hands, hands))


def test_tiles_find_the_small_faces(sample_detections):
    rgb, faces, _ = sample_detections["sample4.jpg"]
    whole_only, _ = detect(rgb, tiles=False, hands=False)
    assert len(whole_only) < len(faces)


def test_inputs_pil_path_float_and_an_empty_scene(sample_photos, tmp_path):
    from PIL import Image

    path = sample_photos[1]
    small = Image.open(path).convert("RGB").resize((640, 456))
    from_pil = detect(small)
    assert detect(np.asarray(small, dtype=np.float32) / 255.0) == from_pil
    small.save(tmp_path / "small.png")
    assert detect(tmp_path / "small.png") == from_pil
    assert len(from_pil[0]) >= 1

    blank = np.full((300, 400, 3), 127, np.uint8)
    faces, hands = detect(blank)
    assert faces == [] and hands == []
    face_mask, hand_mask = region_masks(blank)
    assert face_mask.shape == (300, 400) and not face_mask.any() and not hand_mask.any()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="min_confidence"):
        detect(np.zeros((8, 8, 3), np.uint8), min_confidence=0)
    with pytest.raises(ValueError, match="HxWx3"):
        detect(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="size="):
        region_masks(([], []))


def test_detectors_are_created_once(sample_photos):
    rgb = np.full((64, 64, 3), 90, np.uint8)
    detect(rgb)
    cached = dict(detection_module._cache)
    detect(rgb)
    detect(rgb, tiles=False)
    assert detection_module._cache == cached and len(cached) >= 1


def test_to_latent_keeps_a_six_pixel_hand():
    mask = np.zeros((1024, 1024), np.float32)
    mask[497:503, 329:335] = 1.0  # 6x6 px between the pixels a nearest resize samples
    for mode in ("max", "area"):
        latent = to_latent(mask, (128, 128), mode=mode)
        assert isinstance(latent, np.ndarray) and latent.dtype == np.float32 and latent.shape == (128, 128)
        assert latent.max() > 0 and latent.sum() > 0
    assert to_latent(mask, (128, 128)).max() == 1.0
    assert to_latent(mask, (128, 128), mode="area").sum() == pytest.approx(36 / 64)
    # the nearest resize of the reference code erases it
    nearest = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=(128, 128), mode="nearest")
    assert nearest.sum() == 0


def test_to_latent_shapes_and_types():
    batch = torch.zeros(2, 3, 100, 60)
    batch[1, 2, 50, 30] = 1
    out = to_latent(batch, (13, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 13, 8) and out[1, 2].max() == 1
    with pytest.raises(ValueError):
        to_latent(np.zeros(5), (2, 2))


def test_boxes_mask_padding_dilation_feather():
    box = (40.0, 40.0, 60.0, 60.0)
    plain = boxes_mask([box], (100, 100), padding=0.0)
    assert plain.sum() == 400
    padded = boxes_mask([box], (100, 100), padding=0.1)
    assert padded.sum() == 24 * 24
    dilated = boxes_mask([box], (100, 100), padding=0.0, dilation=5)
    assert dilated[50, 35] == 1 and dilated[50, 34] == 0 and dilated[35, 35] == 0  # round corners
    feathered = boxes_mask([box], (100, 100), padding=0.0, feather=10)
    assert feathered[40:60, 40:60].min() == 1.0  # the box itself stays fully covered
    assert 0 < feathered[50, 35] < 1 and feathered[50, 25] == 0
    assert np.all(np.diff(feathered[50, 25:41]) >= 0)  # ramps up toward the box
    edge = boxes_mask([(95.2, 0, 100, 3.5)], (10, 100), padding=0.0)
    assert edge[:4, 95:].min() == 1 and edge.sum() == 4 * 5  # partial pixels count as covered


def test_tiles_cover_the_image_and_merge_prefers_whole_views():
    windows = tile_windows(1367, 1920, 480)
    covered = np.zeros((1367, 1920), bool)
    for x0, y0, x1, y1 in windows:
        assert x1 - x0 == 480 and y1 - y0 == 480
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert tile_windows(400, 480, 480) == [] and tile_windows(590, 600, 480) == []
    # a side within 25 % of a tile is not split: one row of full-height windows
    assert {(y0, y1) for _, y0, _, y1 in tile_windows(683, 1024, 640)} == {(0, 683)}
    # any object up to half a tile lies wholly inside some window
    for x, y in itertools.product(range(0, 1920 - 240, 97), range(0, 1367 - 240, 89)):
        assert any(wx0 <= x and x + 240 <= wx1 and wy0 <= y and y + 240 <= wy1 for wx0, wy0, wx1, wy1 in windows)

    boxes = [(5, 5, 50, 95), (0, 0, 100, 100), (200, 200, 250, 250), (10, 10, 95, 95)]
    kept = merge_duplicates(boxes, [0.99, 0.8, 0.7, 0.9], partial=[True, False, False, False])
    assert kept == [3, 2]  # the cut-off box loses to whole views; the loose box is a duplicate
    assert merge_duplicates([], []) == []


def test_face_is_a_frozen_record():
    face = Face(box=(1.0, 2.0, 3.0, 4.0), score=0.9)
    with pytest.raises(Exception):
        face.score = 1.0
    assert face.to_json() == {"box": [1.0, 2.0, 3.0, 4.0], "score": 0.9}
