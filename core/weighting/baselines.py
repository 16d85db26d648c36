"""The baseline weightings of the FairHuman paper's Table 5 (besides MPD and Nash-MTL), on the
contract of ``base.Weighting``."""
from __future__ import annotations

import torch

from .base import Weighting, floor_vanishing


class LinearScalarization(Weighting):
    """Fixed weights (default all ones): d is the gradient of Σ w_i L_i."""

    def __init__(self, weights=None, objectives: int = 3):
        super().__init__(objectives)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32).flatten()
        if self.weights is not None:
            if self.weights.numel() != self.objectives:
                raise ValueError(f"ls has {self.weights.numel()} weights for {self.objectives} objectives")
            if not (torch.isfinite(self.weights).all() and (self.weights >= 0).all()):
                raise ValueError(f"ls weights must be finite and non-negative, got {self.weights.tolist()}")
            # unequal fixed weights treat the objectives differently by design
            self.symmetric = bool((self.weights == self.weights[0]).all())

    def __call__(self, gram, losses=None, generator=None, active=None):
        rows = self.rows(gram.shape[0], active)
        w = torch.ones(self.objectives) if self.weights is None else self.weights
        return w[rows].to(gram)


class DWA(Weighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): w_i = k softmax(r / T)_i with
    r_i = L_i(t-1) / L_i(t-2), the ratio of the last two steps' losses; ones for two steps.
    The history is kept per objective; one absent from a step keeps its last loss (ratio 1 if
    it has none)."""

    def __init__(self, temperature: float = 2.0, objectives: int = 3):
        super().__init__(objectives)
        if not temperature > 0:
            raise ValueError(f"dwa temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.history: list[torch.Tensor] = []  # the last two steps' losses, (objectives,), NaN: never seen

    def __call__(self, gram, losses, generator=None, active=None):
        rows = self.rows(gram.shape[0], active)
        if len(self.history) < 2:
            w = torch.ones(len(rows))
        else:
            ratio = self.history[-1][rows] / self.history[-2][rows].clamp_min(1e-12)
            w = len(rows) * torch.softmax(torch.nan_to_num(ratio, nan=1.0) / self.temperature, dim=0)
        last = self.history[-1].clone() if self.history else torch.full((self.objectives,), float("nan"))
        last[rows] = losses.detach().float().cpu()
        self.history = (self.history + [last])[-2:]
        return w.to(gram)

    def state_dict(self):
        return {"history": [h.clone() for h in self.history]}

    def load_state_dict(self, state):
        self.history = [torch.as_tensor(h, dtype=torch.float32) for h in state.get("history", [])]


class UW(Weighting):
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): total = Σ exp(-s_i) L_i + s_i
    with learned log-variances s. The update uses w_i = exp(-s_i); the s get their own gradient
    1 - exp(-s_i) L_i (zero for an absent objective), set here, and are stepped by the training
    optimizer."""

    def __init__(self, objectives: int = 3):
        super().__init__(objectives)
        self.log_vars = torch.zeros(self.objectives, requires_grad=True)

    def parameters(self):
        return [self.log_vars]

    def __call__(self, gram, losses, generator=None, active=None):
        rows = self.rows(gram.shape[0], active)
        s = self.log_vars.detach()[rows]
        grad = torch.zeros(self.objectives)
        grad[rows] = 1.0 - torch.exp(-s) * losses.detach().float().cpu()
        self.log_vars.grad = grad if self.log_vars.grad is None else self.log_vars.grad + grad
        return torch.exp(-s).to(gram)

    def state_dict(self):
        return {"log_vars": self.log_vars.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.log_vars.copy_(state["log_vars"])


class RLW(Weighting):
    """Random Loss Weighting (Lin et al., TMLR 2022): w = softmax(z), z ~ N(0, I) each step,
    drawn from the step's generator so a resumed run draws the same weights. Symmetric only in
    distribution: one draw assigns its values by index."""

    symmetric = False

    def __call__(self, gram, losses=None, generator=None, active=None):
        z = torch.randn(gram.shape[0], generator=generator)
        return torch.softmax(z, dim=0).to(gram)


class SI(Weighting):
    """Scale-invariant baseline: minimize Σ log L_i, i.e. w_i = 1 / L_i. A loss below 1e-6 of
    the step's largest counts as that floor (``floor_vanishing``): w_j g_j → 0 as L_j → 0 where
    1 / L_j would grow as L_j^(-1/2) for a squared error."""

    loss_power = -1.0

    def __call__(self, gram, losses, generator=None, active=None):
        return (1.0 / floor_vanishing(losses.detach().float()).clamp_min(1e-12)).to(gram)
