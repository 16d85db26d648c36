"""Fair gradient combination: per-objective gradients → Gramian → weights → d = Σ w_i g_i.

One forward gives the K objective losses. One *batched* vector-Jacobian product (``vmap`` over
the backward pass, ``is_grads_batched``) gives every objective's gradient with respect to the
trainable (LoRA) tensors at once; where a kernel does not support it, K backward passes through
the retained graph give the same. The K×K Gramian is accumulated tensor by tensor in fp32 with
dot products (no flattened params×K copy), the weighting maps it to weights on the parameters'
device (no host synchronisation), and d is formed in place in the first objective's gradient,
which becomes ``.grad``: at its peak a step holds K gradients where a plain LoRA step holds one,
so the extra memory is (K−1) × the LoRA parameters' gradient bytes.

What the reference code gets wrong, and what this does instead:
- loss scaling (fp16 GradScaler): gradients are divided by ``loss_scale`` *before* the
  Gramian, so the weights and the update do not depend on the scaler's scale;
- gradient accumulation: every micro-batch's per-objective gradients are summed and the weights
  are solved once per optimizer step from the sums, so N micro-batches of size B/N give the
  update of one batch of size B (exactly, for mean-reduced losses);
- several processes: each objective's gradient is averaged across processes (``reduce``)
  before the Gramian, so every rank solves the same weights and writes the same d;
- clipping: d is what lands in ``.grad``, so ``clip_grad_norm_`` afterwards clips the combined
  gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class FairStep:
    weights: torch.Tensor  # (K,), 0 for inactive objectives
    gram: torch.Tensor  # (K, K) fp32 Gramian of the unscaled, reduced objective gradients
    active: torch.Tensor  # (K,) bool

    @property
    def grad_norms(self) -> torch.Tensor:
        return torch.diagonal(self.gram).clamp_min(0).sqrt()


class FairCombiner:
    """Collects per-objective gradients over an optimizer step's micro-batches (``add``) and
    writes their fair combination into ``.grad`` (``step``).

    Gradients are held per parameter tensor as one (K, *shape) tensor — the layout the batched
    product returns — so the Gramian and the combination cost one matrix product each per
    parameter tensor, not K² small kernels.
    """

    def __init__(self, params: Sequence[torch.Tensor], weighting, objectives: int,
                 reduce: Callable[[list[torch.Tensor]], None] | None = None, batched: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.weighting, self.k, self.reduce, self.batched = weighting, objectives, reduce, batched
        self.reset()

    def reset(self) -> None:
        """Forget what was collected (also: a skipped optimizer step)."""
        self.grads: list[torch.Tensor] | None = None  # per parameter: (K, *shape)
        self.active = torch.zeros(self.k, dtype=torch.bool)
        self.losses = torch.zeros(self.k)

    def _vjps(self, losses: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Per parameter, the gradients of ``losses[indices]`` stacked as (len(indices), *shape)."""
        if self.batched:
            try:
                eye = torch.eye(len(indices), dtype=losses.dtype, device=losses.device)
                return list(torch.autograd.grad(losses[indices], self.params, grad_outputs=eye,
                                                is_grads_batched=True, materialize_grads=True))
            except (RuntimeError, NotImplementedError):
                self.batched = False  # a kernel without a batching rule: K backward passes instead
        rows = [torch.autograd.grad(losses[i], self.params, retain_graph=n < len(indices) - 1,
                                    materialize_grads=True) for n, i in enumerate(indices)]
        return [torch.stack(per_param) for per_param in zip(*rows)]

    def add(self, losses: torch.Tensor, active: torch.Tensor | None = None, loss_scale: float = 1.0) -> None:
        """Backward one micro-batch's active objectives and add their unscaled gradients."""
        if losses.shape != (self.k,):
            raise ValueError(f"expected {self.k} losses, got shape {tuple(losses.shape)}")
        flags = torch.ones(self.k, dtype=torch.bool) if active is None else active.detach().cpu().bool()
        indices = torch.nonzero(flags).flatten().tolist()
        grads = self._vjps(losses, indices)
        if len(indices) < self.k:  # an empty mask: its row stays zero
            full = [g.new_zeros((self.k, *g.shape[1:])) for g in grads]
            rows = torch.tensor(indices, device=grads[0].device)
            for f, g in zip(full, grads):
                f.index_copy_(0, rows, g)
            grads = full
        if loss_scale != 1.0:
            torch._foreach_div_(grads, loss_scale)
        if self.grads is None:
            self.grads = grads
        else:
            torch._foreach_add_(self.grads, grads)
        self.active |= flags
        self.losses += losses.detach().float().cpu()

    def step(self, generator: torch.Generator | None = None) -> FairStep:
        """Reduce, build the Gramian, solve the weights, write d = Σ w_i g_i into ``.grad``."""
        if self.grads is None:
            raise RuntimeError("step() before any add()")
        device = self.grads[0].device
        active = self.active.to(device)
        if self.reduce is not None:
            flags = active.float()
            self.reduce([flags])  # an objective absent here may be present on another rank
            self.reduce(self.grads)
            active = flags > 0
        gram = torch.zeros(self.k, self.k, dtype=torch.float32, device=device)
        for g in self.grads:  # one parameter tensor at a time, in fp32
            flat = g.reshape(self.k, -1).float()
            gram.addmm_(flat, flat.T)
        idx = torch.nonzero(active).flatten()
        weights = torch.zeros(self.k, dtype=torch.float32, device=device)
        sub = gram.index_select(0, idx).index_select(1, idx)
        weights[idx] = self.weighting(sub, self.losses.to(device)[idx], generator=generator).float().to(device)
        for g, p in zip(self.grads, self.params):
            # d in place in row 0: no new parameter-sized tensor (.grad is a view of this step's
            # stacked gradients, released with it at the next zero_grad)
            flat = g.reshape(self.k, -1)
            d = flat[0].mul_(weights[0].to(flat.dtype))
            d.addmv_(flat[1:].T, weights[1:].to(flat.dtype))
            p.grad = d.view_as(p) if d.dtype == p.dtype else d.view_as(p).to(p.dtype)
        self.reset()
        return FairStep(weights, gram, active.cpu())

