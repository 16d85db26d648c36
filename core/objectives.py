"""FairHuman's three objectives from one prediction: global, face-masked, hand-masked.

Two normalizations of the masked losses, named in the training config:

- ``reference`` — the squared error of the masked residual scaled by ``local_scale`` *inside*
  the square, averaged over all elements, ``mean((s · m ⊙ (pred − target))²)``. With s = 1 it
  is the paper's Eq. 2, the masked MSE ``mean((m ⊙ (pred − target))²)``; with s = 5 (the
  default) it is the release code's (``scale=5.0`` inside its ``mse_loss``), 25 × Eq. 2. Its
  size grows with the region's area, so a small hand's loss is small in absolute terms.
- ``area`` — the mean squared error over the masked elements only,
  ``Σ m ⊙ (pred − target)² / (C · Σ m)``: the same scale as the global loss whatever the area.

MPD is not scale-invariant (see ``core.weighting.mpd``), so these choices change the weights: a
masked loss 25 times larger gets a smaller share of the update, not a larger one.
An objective whose mask is empty across the whole batch is *inactive*: its loss is an exact 0
with no gradient, and the combination gives it weight 0 — never a NaN.
"""
from __future__ import annotations

import torch

NAMES = ("global", "face", "hand")
NORMALIZATIONS = ("reference", "area")


def regional_losses(pred: torch.Tensor, target: torch.Tensor, face_mask: torch.Tensor, hand_mask: torch.Tensor,
                    *, normalization: str = "reference", local_scale: float = 5.0):
    """(losses (3,) ordered global, face, hand; active (3,) bool).

    ``pred``/``target``: (B, C, h, w); masks: (B, 1, h, w) on the same grid, values in [0, 1].
    ``local_scale`` applies to the ``reference`` normalization only (1: Eq. 2, 5: the release).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    if not local_scale > 0:
        raise ValueError(f"local_scale must be positive, got {local_scale}")
    err = (pred.float() - target.float()) ** 2
    losses, active = [err.mean()], [torch.ones((), dtype=torch.bool, device=err.device)]
    channels = err.shape[1]
    for mask in (face_mask, hand_mask):
        m = mask.to(err).expand_as(err[:, :1])
        area = m.sum()
        has = area > 0
        if normalization == "reference":
            loss = (local_scale * local_scale * m * m * err).mean()
        else:
            loss = (m * err).sum() / (channels * area.clamp_min(torch.finfo(err.dtype).tiny))
        # where(has, loss, 0) keeps the graph but an empty mask contributes an exact zero.
        losses.append(torch.where(has, loss, torch.zeros_like(loss)))
        active.append(has)
    return torch.stack(losses), torch.stack(active)
