"""α-fair (Minimum Potential Delay for α = 2) weights from the Gramian K = G Gᵀ.

The weights solve ``(K w)_i = w_i^(-1/α)``, w > 0, the stationarity condition of the strictly
convex problem  min_w  ½ wᵀ K w − Σ_i φ(w_i)  with φ'(w) = w^(-1/α) (φ = log for α = 1, the Nash
bargaining case; φ(w) = w^(1-1/α) / (1 - 1/α) otherwise). It is solved exactly by Newton's method
on that problem, in float64, with a fraction-to-the-boundary step so w stays positive: a fixed
number of iterations of 3×3 linear algebra on K's own device — no scipy, no ``.item()``, no host
synchronisation.

No regularization is needed by the solver: the Newton system's matrix K + diag(w^(-1/α-1)/α) is
positive definite for any positive semi-definite K, so ill-conditioned (cond 1e8) and
rank-deficient K are solved to the 1e-6 residual tested. A solution exists unless some
non-negative combination of the gradients cancels exactly (then the weights would grow without
bound); the fixed iteration count keeps them finite in that case. K is normalized by its mean
diagonal first and the weights rescaled after, so its units do not matter.

Scale (MPD is not scale-invariant, which is why the loss normalization matters):
- all gradients scaled by c: K → c²K, w → c^(-2α/(α+1)) w, and d → c^((1-α)/(1+α)) d
  (c^(-1/3) at α = 2);
- one loss L_j multiplied by c: g_j → c g_j. With v = (w'_1, …, c w'_j, …) the equations become
  (K v)_i = v_i^(-1/α) for i ≠ j and (K v)_j = c^(1/α - 1) v_j^(-1/α): objective j's demand
  shrinks. When g_j is orthogonal to the others this gives exactly w'_j = c^(-2α/(α+1)) w_j
  (c^(-4/3) at α = 2), its contribution w'_j g'_j = c^((1-α)/(α+1)) w_j g_j (c^(-1/3)), and every
  other weight unchanged; in general all weights move. So a masked loss inflated by a constant
  (the reference normalization's local scale, say) gets a *smaller* share of the update.
"""
from __future__ import annotations

import torch

from .base import Weighting

EIGEN_FLOOR = 1e-12  # closed form only: K^(-p) of a singular K


def _normalized(gram: torch.Tensor):
    k = gram.to(torch.float64)
    k = 0.5 * (k + k.T)
    scale = torch.diagonal(k).mean().clamp_min(torch.finfo(torch.float64).tiny)
    return k / scale, scale


def mpd_weights(gram: torch.Tensor, alpha: float = 2.0, iterations: int = 30) -> torch.Tensor:
    """Exact α-fair weights (K w)_i = w_i^(-1/α), returned in ``gram``'s dtype and device."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square, got shape {tuple(gram.shape)}")
    if alpha <= 0:
        raise ValueError("alpha must be positive")
    k, scale = _normalized(gram)
    p = 1.0 / alpha
    # Start from the diagonal solution w_i = K_ii^(-α/(α+1)).
    w = torch.diagonal(k).clamp_min(1e-300) ** (-alpha / (alpha + 1.0))
    for _ in range(iterations):
        grad = k @ w - w ** (-p)
        hess = k + torch.diag(p * w ** (-p - 1.0))
        # solve_ex: no host-side check of the result (the Hessian is positive definite)
        step = -torch.linalg.solve_ex(hess, grad)[0]
        # Largest step keeping w > 0, at most 1 (fraction to the boundary: 0.9 of the way).
        ratio = torch.where(step < 0, -0.9 * w / step, torch.full_like(w, float("inf")))
        t = torch.clamp(ratio.min(), max=1.0)
        w = w + t * step
    # Undo the normalization: K = s·K̃  ⇒  w = s^(-α/(α+1)) w̃.
    w = w * scale ** (-alpha / (alpha + 1.0))
    return w.to(gram.dtype)


def mpd_closed_form(gram: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """The FairHuman paper's approximation w = K^(-α/(α+1)) 1 (K^(-2/3) 1 at α = 2), exact only
    for diagonal K; entries can come out negative when gradients conflict."""
    k, scale = _normalized(gram)
    vals, vecs = torch.linalg.eigh(k)
    power = vecs @ torch.diag(vals.clamp_min(EIGEN_FLOOR) ** (-alpha / (alpha + 1.0))) @ vecs.T
    w = power @ torch.ones(k.shape[0], dtype=k.dtype, device=k.device)
    return (w * scale ** (-alpha / (alpha + 1.0))).to(gram.dtype)


class MPD(Weighting):
    """Exact α-fair weights. Non-conflicting: (K w)_i = w_i^(-1/α) > 0 is g_i · d."""

    non_conflicting = True

    def __init__(self, alpha: float = 2.0, iterations: int = 30, objectives: int = 3):
        super().__init__(objectives)
        if not alpha > 0:
            raise ValueError(f"mpd alpha must be positive, got {alpha}")
        self.alpha, self.iterations = float(alpha), int(iterations)

    @property
    def gram_power(self) -> float:
        return -self.alpha / (self.alpha + 1.0)

    def __call__(self, gram, losses=None, generator=None, active=None):
        return mpd_weights(gram, self.alpha, self.iterations)


class NashMTL(MPD):
    """Nash-MTL (Navon et al., ICML 2022): Nash bargaining, the α = 1 case, (K w)_i = 1 / w_i."""

    def __init__(self, iterations: int = 30, objectives: int = 3):
        super().__init__(alpha=1.0, iterations=iterations, objectives=objectives)


class MPDClosedForm(Weighting):
    """The paper's approximation; can go negative when gradients conflict."""

    non_negative = False

    def __init__(self, alpha: float = 2.0, objectives: int = 3):
        super().__init__(objectives)
        if not alpha > 0:
            raise ValueError(f"mpd-closed-form alpha must be positive, got {alpha}")
        self.alpha = float(alpha)

    @property
    def gram_power(self) -> float:
        return -self.alpha / (self.alpha + 1.0)

    def __call__(self, gram, losses=None, generator=None, active=None):
        return mpd_closed_form(gram, self.alpha)
