"""Latent Adaptive Normalization (LAN, HG-DPO Eq. 7).

The tuned model's sampling trajectory drifts in per-channel statistics from the reference
model's, which shows as colour casts and washed-out images at high LoRA strength. LAN runs the
reference model from the same noise and, after every sampler step, sets each channel's mean and
standard deviation of the tuned latent to the reference latent's at that step.

Stats are per sample and per channel over the spatial dimensions. ``strength`` blends the
normalized latent with the unnormalized one (0: untouched, bit for bit; 1: full LAN).
"""
from __future__ import annotations

import torch

EPS = 1e-6  # std floor: a constant channel has std 0; it is shifted, never divided by zero


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) over every dimension after the channel one, shaped to broadcast against x."""
    dims = tuple(range(2, x.ndim))
    x32 = x.float()
    return x32.mean(dim=dims, keepdim=True), x32.std(dim=dims, keepdim=True, unbiased=False)


def match_channel_stats(x: torch.Tensor, reference, strength: float = 1.0) -> torch.Tensor:
    """x with each (sample, channel)'s mean and std set to the reference's, blended by strength.

    ``reference`` is a latent shaped like x, or its ``channel_stats`` (mean, std). A channel
    of x with zero std is only shifted to the reference mean.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return x
    ref_mean, ref_std = channel_stats(reference) if isinstance(reference, torch.Tensor) else reference
    mean, std = channel_stats(x)
    scale = torch.where(std > EPS, ref_std.to(std) / std.clamp_min(EPS), torch.ones_like(std))
    normalized = (x.float() - mean) * scale + ref_mean.to(mean)
    out = normalized if strength == 1.0 else torch.lerp(x.float(), normalized, strength)
    return out.to(x.dtype)


class StatsRecorder:
    """Records the reference trajectory's stats at each step, then normalizes the tuned
    trajectory against them step by step — one model resident at a time."""

    def __init__(self):
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(self, x: torch.Tensor) -> None:
        mean, std = channel_stats(x)
        self.stats.append((mean.detach().clone(), std.detach().clone()))

    def normalize(self, x: torch.Tensor, step: int, strength: float) -> torch.Tensor:
        if step >= len(self.stats):
            raise IndexError(f"no reference statistics for step {step} (recorded {len(self.stats)})")
        mean, std = self.stats[step]
        return match_channel_stats(x, (mean.to(x.device), std.to(x.device)), strength)
