"""HG-DPO's training losses: Diffusion-DPO and the statistic-matching loss.

Diffusion-DPO (Wallace et al., 2024), for a winner/loser pair sharing noise ε and timestep t,
with per-sample denoising errors e = ‖ε − ε̂(x_t, t)‖² (mean over latent elements) of the tuned
model θ and the frozen reference:

    Δ      = (e_θ(w) − e_θ(l)) − (e_ref(w) − e_ref(l))
    L_DPO  = −log σ(−β/2 · Δ)

The implicit reward margin is −β/2 · Δ (positive when the tuned model prefers the winner more
than the reference does); the implicit accuracy is the fraction of pairs where it is positive.
When the tuned model is the reference, Δ = 0 and L_DPO = log 2.

Statistic matching (HG-DPO): from the winner's noisy latent x_t, one DDPM step to t−1 with each
model (no guidance); the loss is the squared difference of the channel means of the two x_{t−1},
weighted by λ_stat. Both steps share x_t (and the step's noise, which cancels), so only the
posterior-mean term of the predicted x0 differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, (B,)."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)


def diffusion_dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                       beta: float) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) from per-sample errors of the tuned model and the reference on winners
    and losers. Metrics: ``reward_margin`` (mean −β/2·Δ) and ``accuracy``."""
    delta = (model_w - model_l) - (ref_w.detach() - ref_l.detach())
    inside = -0.5 * beta * delta
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


def stat_matching_loss(prev_tuned: torch.Tensor, prev_reference: torch.Tensor) -> torch.Tensor:
    """Squared difference of the per-sample channel means of two latents, averaged."""
    dims = tuple(range(2, prev_tuned.ndim))
    return ((prev_tuned.float().mean(dims) - prev_reference.detach().float().mean(dims)) ** 2).mean()
