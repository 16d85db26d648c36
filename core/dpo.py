"""HG-DPO's training losses: Diffusion-DPO and the statistic-matching loss.

Diffusion-DPO (Wallace et al., 2024), for a winner/loser pair sharing noise ε and timestep t,
with per-sample denoising errors e = ‖ε − ε̂(x_t, t)‖² (mean over latent elements; on a flow model
such as Flux the velocity error ‖(ε − x0) − v̂(x_t, σ)‖², the family's target) of the tuned
model θ and the frozen reference:

    Δ      = (e_θ(w) − e_θ(l)) − (e_ref(w) − e_ref(l))
    L_DPO  = −log σ(−β/2 · Δ)

The implicit reward margin is −β/2 · Δ (positive when the tuned model prefers the winner more
than the reference does); the implicit accuracy is the fraction of pairs where it is positive.
When the tuned model is the reference, Δ = 0 and L_DPO = log 2.

Statistic matching (HG-DPO): from the winner's noisy latent x_t, one DDPM step to t−1 with each
model (no guidance); the loss compares the channel means μ ∈ R^C of the two x_{t−1}, weighted by
λ_stat. Both steps share x_t (and the step's noise, which cancels), so only the posterior-mean
term of the predicted x0 differs. On a flow model (Flux) the one-step sample is the predicted x0
itself, x_t − σ·v̂, with C = 16 (the step is the family's ``stat_latent``). Two reductions over the
C channels, averaged over the batch:

- ``squared-norm``: ‖μ_θ − μ_ref‖², the paper's Eq. 8 read literally;
- ``channel-mean``: ‖μ_θ − μ_ref‖² / C, the mean over channels — C times smaller (SD: 4), so the
  same λ_stat acts as λ_stat / C. The default: this pack's first reduction, kept so a run saved
  before the option existed resumes with the loss it started with (``--preset paper`` takes
  the literal one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, (B,)."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)


def implicit_reward_margin(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor,
                           ref_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Per pair, −β/2 · Δ with Δ = (e_θ(w) − e_θ(l)) − (e_ref(w) − e_ref(l)), (B,)."""
    return -0.5 * beta * ((model_w - model_l) - (ref_w.detach() - ref_l.detach()))


def diffusion_dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                       beta: float) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) from per-sample errors of the tuned model and the reference on winners
    and losers. Metrics: ``reward_margin`` (mean −β/2·Δ) and ``accuracy``."""
    inside = implicit_reward_margin(model_w, model_l, ref_w, ref_l, beta)
    loss = -F.logsigmoid(inside).mean()
    metrics = {"reward_margin": inside.detach().mean(), "accuracy": (inside.detach() > 0).float().mean()}
    return loss, metrics


def ddpm_posterior_mean(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                        alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Mean of q(x_{t−1} | x_t, x0), the deterministic part of one DDPM step (t ≥ 0; at t = 0
    it is x0)."""
    a_t = alphas_cumprod[t].view(-1, 1, 1, 1).float()
    prev = torch.where(t > 0, t - 1, t)
    a_prev = torch.where(t > 0, alphas_cumprod[prev], torch.ones_like(alphas_cumprod[prev])).view(-1, 1, 1, 1).float()
    beta_t = 1 - a_t / a_prev
    coef_x0 = a_prev.sqrt() * beta_t / (1 - a_t)
    coef_xt = (a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t)
    return coef_x0 * x0.float() + coef_xt * x_t.float()


STAT_REDUCTIONS = ("squared-norm", "channel-mean")


def stat_matching_loss(prev_tuned: torch.Tensor, prev_reference: torch.Tensor,
                       reduction: str = "channel-mean") -> torch.Tensor:
    """The squared difference of the per-sample channel means of two (B, C, ...) latents, summed
    over the channels (``squared-norm``, Eq. 8) or averaged (``channel-mean``), then averaged
    over the batch."""
    if reduction not in STAT_REDUCTIONS:
        raise ValueError(f"unknown statistic-loss reduction {reduction!r}; expected one of {STAT_REDUCTIONS}")
    dims = tuple(range(2, prev_tuned.ndim))
    squared = (prev_tuned.float().mean(dims) - prev_reference.detach().float().mean(dims)) ** 2  # (B, C)
    per_sample = squared.sum(1) if reduction == "squared-norm" else squared.mean(1)
    return per_sample.mean()


# ---- regional DPO (fair-dpo): the same implicit reward, over a region of each image --------------
def masked_per_sample_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(errors (B,), present (B,) bool): per sample, the mean squared error over the mask's
    elements, Σ m ⊙ (pred − target)² / (C · Σ m), so a region's error has the global error's
    scale whatever its area (a full mask gives ``per_sample_error``). ``mask``: (B, 1, h, w) or
    (B, h, w) on the latent grid, values in [0, 1]; an empty mask gives an error of exactly 0,
    with no gradient, and ``present`` False."""
    err = (pred.float() - target.float()) ** 2
    m = (mask if mask.ndim == err.ndim else mask.unsqueeze(1)).to(err).expand_as(err[:, :1])
    area = m.flatten(1).sum(dim=1)
    total = (m * err).flatten(1).sum(dim=1)
    present = area > 0
    # an empty mask divides by 1, not by a tiny floor: 1/tiny times a gradient overflows to inf,
    # and inf × the mask's 0 is NaN
    return total / (err.shape[1] * torch.where(present, area, torch.ones_like(area))), present


def regional_dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                      beta: float, active: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Diffusion-DPO over the pairs where ``active`` (B,) bool (the region is in the winner, the
    loser or both): the mean of −log σ(−β/2·Δ) over them. An image without the region has a
    regional error of 0 for both models, so it adds nothing to Δ. With no active pair the loss
    is an exact 0 that keeps the graph (its objective is inactive). Metrics as
    ``diffusion_dpo_loss``'s over the active pairs, plus ``pairs`` (how many)."""
    inside = implicit_reward_margin(model_w, model_l, ref_w, ref_l, beta)
    weight = active.to(inside.dtype)
    count = weight.sum()
    denom = count.clamp_min(1.0)
    loss = (-F.logsigmoid(inside) * weight).sum() / denom
    inside = inside.detach()
    metrics = {"reward_margin": (inside * weight).sum() / denom,
               "accuracy": ((inside > 0).to(weight) * weight).sum() / denom, "pairs": count}
    return loss, metrics


def regional_dpo_losses(pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                        masks: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(losses (1+R,), active (1+R,) bool, metrics per objective) of 2n images, winners then
    losers: the Diffusion-DPO loss over the whole latent, then over each of R regions, each
    image's error taken over its own mask. ``masks``: (2n, R, h, w) on the latent grid. The
    reference's errors are taken without gradients."""
    n = pred.shape[0] // 2
    full = torch.ones_like(masks[:, :1])
    losses, active, metrics = [], [], []
    for r, mask in enumerate(torch.cat([full, masks], dim=1).unbind(1)):
        err, present = masked_per_sample_error(pred, target, mask)
        with torch.no_grad():
            ref, _ = masked_per_sample_error(ref_pred, target, mask)
        pairs = present[:n] | present[n:]
        loss, m = regional_dpo_loss(err[:n], err[n:], ref[:n], ref[n:], beta, pairs)
        losses.append(loss)
        active.append(pairs.any())
        metrics.append(m)
    return torch.stack(losses), torch.stack(active), metrics
