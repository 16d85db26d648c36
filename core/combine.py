"""Fair gradient combination: per-objective gradients → Gramian → weights → d = Σ w_i g_i.

One forward gives the K objective losses; K backward passes through the retained graph give
each objective's gradient with respect to the trainable (LoRA) tensors. They are accumulated in
K persistent fp32 buffers per parameter, allocated once and reused every step (the reference code
allocates a fresh params×K fp32 buffer each step). d is formed in place in the first buffer,
which then *is* ``.grad``: the extra memory over a plain LoRA step is (K−1) gradients.

What the reference code gets wrong, and what this does instead:
- loss scaling (fp16 GradScaler): gradients are divided by ``loss_scale`` *before* the
  Gramian, so the weights and the update do not depend on the scaler's scale;
- gradient accumulation: per-objective gradients of all micro-batches are summed, and the
  weights are solved once per optimizer step from the accumulated gradients — so N micro-batches
  of size B/N give the same update as one batch of size B (for the mean-reduced losses);
- several processes: each objective's gradient is averaged across processes (``reduce``) before
  the Gramian, so every rank solves the same weights from the same K and writes the same d;
- clipping: d is what lands in ``.grad``, so ``clip_grad_norm_`` afterwards clips the combined
  gradient;
- the Gramian is accumulated tensor by tensor in fp32 (no flattened params×K copy), on the
  parameters' device, and the weights are solved there too (no host synchronisation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class FairStep:
    weights: torch.Tensor  # (K,), 0 for inactive objectives
    gram: torch.Tensor  # (K, K) fp32 Gramian of the (unscaled, reduced) objective gradients
    active: torch.Tensor  # (K,) bool

    @property
    def grad_norms(self) -> torch.Tensor:
        return torch.diagonal(self.gram).clamp_min(0).sqrt()


class GradientCombiner:
    """Accumulates per-objective gradients over micro-batches; ``step`` writes d into ``.grad``."""

    def __init__(self, params: Sequence[torch.Tensor], weighting, objectives: int,
                 reduce: Callable[[list[torch.Tensor]], None] | None = None):
        self.params = [p for p in params if p.requires_grad]
        self.weighting, self.k, self.reduce = weighting, objectives, reduce
        self.buffers = [[torch.zeros_like(p, dtype=torch.float32) for p in self.params] for _ in range(objectives)]
        self.active = torch.zeros(objectives, dtype=torch.bool)
        self.losses = torch.zeros(objectives)
        self.pending = False

    def add(self, losses: torch.Tensor, active: torch.Tensor | None = None, loss_scale: float = 1.0) -> None:
        """Backward each active objective of one micro-batch and add its unscaled gradient."""
        if not self.pending:  # first micro-batch of an optimizer step
            for per_objective in self.buffers:
                for buf in per_objective:
                    buf.zero_()
            self.active.zero_()
            self.losses.zero_()
        if losses.shape != (self.k,):
            raise ValueError(f"expected {self.k} losses, got shape {tuple(losses.shape)}")
        active = torch.ones(self.k, dtype=torch.bool) if active is None else active.detach().cpu().bool()
        indices = [i for i in range(self.k) if active[i]]
        for n, i in enumerate(indices):
            grads = torch.autograd.grad(losses[i], self.params, retain_graph=n < len(indices) - 1,
                                        allow_unused=True)
            for buf, g in zip(self.buffers[i], grads):
                if g is not None:
                    buf.add_(g.float(), alpha=1.0 / loss_scale)
        self.active |= active
        self.losses += losses.detach().float().cpu()
        self.pending = True

    def reset(self) -> None:
        """Drop what was accumulated (a skipped optimizer step)."""
        self.pending = False

    def step(self, generator: torch.Generator | None = None) -> FairStep:
        """Reduce, build the Gramian, solve the weights, write d = Σ w_i g_i into ``.grad``."""
        if not self.pending:
            raise RuntimeError("step() before any add()")
        if self.reduce is not None:
            for i in range(self.k):
                self.reduce(self.buffers[i])
            flags = self.active.float()
            self.reduce([flags])
            self.active = flags > 0
        device = self.buffers[0][0].device if self.params else torch.device("cpu")
        gram = torch.zeros(self.k, self.k, dtype=torch.float32, device=device)
        for tensors in zip(*self.buffers):  # one parameter tensor at a time
            flat = torch.stack([t.reshape(-1) for t in tensors])
            gram += flat @ flat.T
        idx = torch.nonzero(self.active.to(device), as_tuple=True)[0]
        weights = torch.zeros(self.k, dtype=torch.float32, device=device)
        if idx.numel():
            sub = gram.index_select(0, idx).index_select(1, idx)
            sub_losses = self.losses.to(device).index_select(0, idx)
            weights[idx] = self.weighting(sub, sub_losses, generator=generator).float().to(device)
        for p, tensors in zip(self.params, zip(*self.buffers)):
            d = tensors[0].mul_(weights[0])
            for w, t in zip(weights[1:], tensors[1:]):
                d.addcmul_(t, w)
            p.grad = d if p.dtype == torch.float32 else d.to(p.dtype)
        self.pending = False
        return FairStep(weights, gram, self.active.clone())


def fair_backward(losses, params, weighting, *, active=None, loss_scale: float = 1.0, reduce=None,
                  generator=None) -> FairStep:
    """One micro-batch, one step: the combination of a single forward's K losses."""
    combiner = GradientCombiner(params, weighting, int(losses.shape[0]), reduce)
    combiner.add(losses, active, loss_scale)
    return combiner.step(generator)
