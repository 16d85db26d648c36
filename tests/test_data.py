"""Aligned augmentation, buckets and the deterministic batch order of the region dataset."""
import pytest
import torch

from train_helpers import make_region_dataset
from trainers.data import RegionDataset, StepBatches, aligned_transform, buckets, nearest_bucket


def test_image_and_masks_stay_aligned_under_crop_and_flip():
    # A marker drawn in the image and the same marker as a mask, off-centre so flips matter.
    h, w = 96, 160
    mask = torch.zeros(1, h, w)
    mask[:, 20:40, 10:30] = 1.0
    image = mask.repeat(3, 1, 1) * 2 - 1  # white square on black
    stack = torch.cat([image, mask, mask])
    flipped_seen = 0
    for seed in range(40):
        out, top, left, _ = aligned_transform(stack, (64, 64), torch.Generator().manual_seed(seed),
                                           random_crop=True, flip_p=0.5)
        img_marker = (out[0] + 1) / 2
        assert torch.allclose(img_marker, out[3], atol=1e-5)
        assert torch.allclose(out[3], out[4])
        flipped_seen += int(out[3][:, :32].sum() < out[3][:, 32:].sum())
    assert 0 < flipped_seen < 40  # flips and crops really happened, both ways


def test_buckets_keep_area_and_pick_by_aspect():
    options = buckets(512)
    assert (512, 512) in options
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in options)
    assert all(0.75 < w * h / 512**2 < 1.3 for w, h in options)
    wide = nearest_bucket(1600, 900, options)
    assert wide[0] > wide[1]


def test_step_batches_are_a_pure_function_of_seed_and_step():
    buckets_of = [(64, 64)] * 5 + [(128, 64)] * 3
    a, b = StepBatches(buckets_of, 2, seed=7), StepBatches(buckets_of, 2, seed=7)
    seq_a = [a.batch(n) for n in range(12)]
    assert [b.batch(n) for n in reversed(range(12))][::-1] == seq_a  # any access order
    for _, indices in seq_a:
        assert len({buckets_of[i] for i in indices}) == 1  # one bucket per batch
    other = StepBatches(buckets_of, 2, seed=8)
    assert [other.batch(n) for n in range(12)] != seq_a


def test_small_hand_survives_to_the_latent_grid(tmp_path):
    data = make_region_dataset(tmp_path / "d", count=4, size=128)
    dataset = RegionDataset(data, resolution=128, seed=0)
    item = dataset.item(0, epoch=0)
    face, hand = item["latent_masks"]
    assert item["pixels"].shape == (3, 128, 128) and face.shape == (16, 16)
    assert hand.max() > 0.5 and face.max() > 0.5
    assert dataset.item(3, epoch=0)["latent_masks"][1].sum() == 0  # image 3 has no hand
    again = dataset.item(0, epoch=0)
    assert torch.equal(again["pixels"], item["pixels"])


def test_missing_metadata_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m trainers annotate"):
        RegionDataset(tmp_path, resolution=64, seed=0)
