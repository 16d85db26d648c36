"""LAN on plain tensors: the statistics property, blending, degenerate channels."""
import pytest
import torch

from core.lan import StatsRecorder, channel_stats, match_channel_stats


def _latents(seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g) * scale + shift


def test_full_strength_copies_reference_channel_stats():
    x, ref = _latents(0, shift=3.0, scale=2.5), _latents(1, shift=-1.0, scale=0.3)
    out = match_channel_stats(x, ref, 1.0)
    for got, want in zip(channel_stats(out), channel_stats(ref)):
        assert torch.allclose(got, want, atol=1e-5)
    # per sample and per channel: the spatial pattern of x survives (correlation 1)
    a, b = out[0, 0].flatten(), x[0, 0].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9999


def test_zero_strength_is_the_identity_bit_for_bit():
    x = _latents(2)
    assert match_channel_stats(x, _latents(3), 0.0) is x


def test_half_strength_blends_linearly():
    x, ref = _latents(4, shift=2.0), _latents(5)
    full = match_channel_stats(x, ref, 1.0)
    assert torch.allclose(match_channel_stats(x, ref, 0.5), 0.5 * (x + full), atol=1e-6)


def test_zero_std_channel_is_shifted_not_divided():
    x = _latents(6)
    x[:, 1] = 0.7  # a constant channel
    out = match_channel_stats(x, _latents(7), 1.0)
    assert torch.isfinite(out).all()
    ref_mean, _ = channel_stats(_latents(7))
    assert torch.allclose(out[:, 1].mean(dim=(1, 2)), ref_mean[:, 1, 0, 0], atol=1e-6)


def test_recorded_stats_drive_a_trajectory():
    recorder = StatsRecorder()
    reference = [_latents(10 + i, shift=i * 0.1) for i in range(5)]
    for x in reference:
        recorder.record(x)
    tuned = _latents(20, shift=4.0, scale=3.0)
    for step in range(5):
        tuned = recorder.normalize(tuned * 0.9 + 0.3, step, 1.0)
        for got, want in zip(channel_stats(tuned), channel_stats(reference[step])):
            assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(IndexError):
        recorder.normalize(tuned, 5, 1.0)


def test_strength_out_of_range_is_refused():
    with pytest.raises(ValueError):
        match_channel_stats(_latents(0), _latents(1), 1.5)
