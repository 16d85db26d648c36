"""The baseline weightings of the FairHuman paper's Table 5 (besides MPD and Nash-MTL)."""
from __future__ import annotations

import torch


class LinearScalarization:
    """Fixed weights (default all ones): d is the gradient of Σ w_i L_i."""

    def __init__(self, weights=None):
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)

    def __call__(self, gram, losses=None, generator=None):
        k = gram.shape[0]
        w = torch.ones(k) if self.weights is None else self.weights
        if w.numel() != k:
            raise ValueError(f"ls has {w.numel()} weights for {k} objectives")
        return w.to(gram)


class DWA:
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): w_i = K softmax(r / T)_i with
    r_i = L_i(t-1) / L_i(t-2), the ratio of the last two steps' losses; ones for two steps."""

    def __init__(self, temperature: float = 2.0):
        self.temperature = float(temperature)
        self.history: list[torch.Tensor] = []

    def __call__(self, gram, losses, generator=None):
        k = gram.shape[0]
        if len(self.history) < 2:
            w = torch.ones(k)
        else:
            ratio = self.history[-1] / self.history[-2].clamp_min(1e-12)
            w = k * torch.softmax(ratio / self.temperature, dim=0)
        self.history = (self.history + [losses.detach().float().cpu()])[-2:]
        return w.to(gram)

    def state_dict(self):
        return {"history": [h.clone() for h in self.history]}

    def load_state_dict(self, state):
        self.history = [torch.as_tensor(h) for h in state.get("history", [])]


class UW:
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): total = Σ exp(-s_i) L_i + s_i
    with learned log-variances s. The update uses w_i = exp(-s_i); the s get their own gradient
    1 - exp(-s_i) L_i, set here, and are stepped by the training optimizer."""

    def __init__(self, objectives: int = 3):
        self.log_vars = torch.zeros(objectives, requires_grad=True)

    def parameters(self):
        return [self.log_vars]

    def __call__(self, gram, losses, generator=None):
        s = self.log_vars
        grad = 1.0 - torch.exp(-s.detach()) * losses.detach().float().cpu()
        s.grad = grad if s.grad is None else s.grad + grad
        return torch.exp(-s.detach()).to(gram)

    def state_dict(self):
        return {"log_vars": self.log_vars.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.log_vars.copy_(state["log_vars"])


class RLW:
    """Random Loss Weighting (Lin et al., TMLR 2022): w = softmax(z), z ~ N(0, I) each step,
    drawn from the step's generator so a resumed run draws the same weights."""

    def __call__(self, gram, losses=None, generator=None):
        z = torch.randn(gram.shape[0], generator=generator)
        return torch.softmax(z, dim=0).to(gram)


class SI:
    """Scale-invariant baseline: minimize Σ log L_i, i.e. w_i = 1 / L_i."""

    def __call__(self, gram, losses, generator=None):
        return (1.0 / losses.detach().float().clamp_min(1e-12)).to(gram)
