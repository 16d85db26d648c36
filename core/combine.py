"""Fair gradient combination: per-objective gradients → Gramian → weights → d = Σ w_i g_i.

One forward gives the K objective losses. One *batched* vector-Jacobian product (``vmap`` over
the backward pass, ``is_grads_batched``) gives every objective's gradient with respect to the
trainable tensors at once; where a kernel has no batching rule, K backward passes through the
retained graph give the same (that fallback is taken for that error only, once, and reported
through ``on_fallback``; any other error — an out-of-memory above all — propagates). The K×K
Gramian is accumulated tensor by tensor in fp32 with dot products (no flattened params×K copy),
the weighting maps it to weights on the parameters' device, and d is formed in place in the
first objective's gradient, which becomes ``.grad``: at its peak a step holds K gradients where
a plain step holds one, so the extra memory is (K−1) × the trainable parameters' gradient bytes.

Host synchronisation: ``add`` has none (flags, losses and gradients stay on the device; the
batched product computes all K rows, an absent objective's row being exactly zero). ``step``
reads the K active flags once, because the weighting is given the active objectives'
sub-Gramian; nothing else leaves the device before the caller writes the step's event.

What the reference code gets wrong, and what this does instead:
- loss scaling (fp16 GradScaler): ``loss_scale`` is divided out of the Gramian (by its square,
  exactly for the scaler's powers of two) and of the losses the weighting sees, so the weights
  do not depend on the scale. d stays in the scaled domain of the gradients it is built from,
  exactly like ``.grad`` after ``scaler.scale(loss).backward()``: ``scaler.unscale_`` then
  divides it and checks it for inf/NaN, and ``scaler.step`` skips an overflowed step;
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

    @property
    def shares(self) -> torch.Tensor:
        """Each objective's share of the update d = Σ w_i g_i: (w_i g_i · d) / ‖d‖² =
        w_i (K w)_i / (wᵀ K w), summing to 1. MPD gives a large-gradient objective a small weight,
        so the weights alone understate what it gets; the shares say it."""
        w = self.weights.to(self.gram)
        kw = self.gram @ w
        return w * kw / (w @ kw).clamp_min(torch.finfo(kw.dtype).tiny)


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA/CPU allocator failure (``torch.OutOfMemoryError``, or the RuntimeError older
    builds and other allocators raise)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def missing_batching_rule(err: BaseException) -> bool:
    """Whether ``err`` is vmap's "no batching rule for this operator" (the one reason to fall
    back to K backward passes), as opposed to an out-of-memory or a real bug."""
    if is_out_of_memory(err):
        return False
    text = str(err).strip().lower()
    return isinstance(err, (RuntimeError, NotImplementedError)) and (
        "batching rule" in text or text.startswith("vmap"))


class FairCombiner:
    """Collects per-objective gradients over an optimizer step's micro-batches (``add``) and
    writes their fair combination into ``.grad`` (``step``).

    Gradients are held per parameter tensor as one (K, *shape) tensor — the layout the batched
    product returns — so the Gramian and the combination cost one matrix product each per
    parameter tensor, not K² small kernels.
    """

    def __init__(self, params: Sequence[torch.Tensor], weighting, objectives: int,
                 reduce: Callable[[list[torch.Tensor]], None] | None = None, batched: bool = True,
                 on_fallback: Callable[[str], None] | None = None):
        self.params = [p for p in params if p.requires_grad]
        self.weighting, self.k, self.reduce, self.batched = weighting, objectives, reduce, batched
        self.on_fallback = on_fallback
        self.fallback_reason: str | None = None
        self.reset()

    def reset(self) -> None:
        """Forget what was collected (also: a skipped optimizer step)."""
        self.grads: list[torch.Tensor] | None = None  # per parameter: (K, *shape)
        self.active: torch.Tensor | None = None  # (K,) bool, on the losses' device
        self.losses: torch.Tensor | None = None  # (K,) fp32, unscaled
        self.scale: torch.Tensor | float = 1.0

    def _vjps(self, losses: torch.Tensor, flags: torch.Tensor) -> list[torch.Tensor]:
        """Per parameter, the gradients of all K losses stacked as (K, *shape)."""
        if self.batched:
            eye = torch.eye(self.k, dtype=losses.dtype, device=losses.device)
            try:
                return list(torch.autograd.grad(losses, self.params, grad_outputs=eye,
                                                is_grads_batched=True, materialize_grads=True))
            except (RuntimeError, NotImplementedError) as err:
                if not missing_batching_rule(err):
                    raise
                self.batched = False
                self.fallback_reason = str(err).strip().splitlines()[0][:300]
                if self.on_fallback is not None:
                    self.on_fallback(self.fallback_reason)
        # K backward passes: skipping an absent objective's pass is worth reading K flags
        indices = torch.nonzero(flags).flatten().tolist()
        grads = [torch.zeros((self.k, *p.shape), dtype=p.dtype, device=p.device) for p in self.params]
        for n, i in enumerate(indices):  # one row at a time: K + 1 gradients at the peak
            row = torch.autograd.grad(losses[i], self.params, retain_graph=n < len(indices) - 1,
                                      materialize_grads=True)
            for full, g in zip(grads, row):
                full[i].copy_(g)
        return grads

    def add(self, losses: torch.Tensor, active: torch.Tensor | None = None,
            loss_scale: float | torch.Tensor = 1.0) -> None:
        """Backward one micro-batch's objectives and add their gradients. ``loss_scale``: what
        ``losses`` were multiplied by (a GradScaler's scale, the same for a step's micro-batches)."""
        if losses.shape != (self.k,):
            raise ValueError(f"expected {self.k} losses, got shape {tuple(losses.shape)}")
        flags = (torch.ones(self.k, dtype=torch.bool, device=losses.device) if active is None
                 else active.detach().to(losses.device, torch.bool))
        grads = self._vjps(losses, flags)
        if self.grads is None:
            self.grads = grads
            self.active, self.losses = flags.clone(), torch.zeros(self.k, device=losses.device)
        else:
            torch._foreach_add_(self.grads, grads)
            self.active |= flags
        self.scale = loss_scale
        self.losses += losses.detach().float() / loss_scale

    def step(self, generator: torch.Generator | None = None) -> FairStep:
        """Reduce, build the Gramian, solve the weights, write d = Σ w_i g_i into ``.grad``."""
        if self.grads is None:
            raise RuntimeError("step() before any add()")
        device = self.grads[0].device
        active, losses = self.active.to(device), self.losses.to(device)
        if self.reduce is not None:
            flags = active.float()
            self.reduce([flags, losses])  # an objective absent here may be present on another rank
            self.reduce(self.grads)
            active = flags > 0
        gram = torch.zeros(self.k, self.k, dtype=torch.float32, device=device)
        for g in self.grads:  # one parameter tensor at a time, in fp32
            flat = g.reshape(self.k, -1).float()
            gram.addmm_(flat, flat.T)
        if not (isinstance(self.scale, (int, float)) and self.scale == 1):
            scale = torch.as_tensor(self.scale, dtype=torch.float32, device=device)
            gram = gram / (scale * scale)
        # the one host read of the step: which objectives' sub-Gramian the weighting gets
        rows = torch.nonzero(active.cpu()).flatten()
        idx = rows.to(device)
        weights = torch.zeros(self.k, dtype=torch.float32, device=device)
        sub = gram.index_select(0, idx).index_select(1, idx)
        weights[idx] = self.weighting(sub, losses[idx], generator=generator, active=rows).float().to(device)
        by_dtype = {}  # the weights in each gradient dtype, converted once (this loop runs per tensor)
        for g, p in zip(self.grads, self.params):
            # d in place in row 0: no new parameter-sized tensor (.grad is a view of this step's
            # stacked gradients, released with it at the next zero_grad)
            if g.dtype not in by_dtype:
                cast = weights.to(g.dtype)
                by_dtype[g.dtype] = (cast[0], cast[1:])
            first, rest = by_dtype[g.dtype]
            flat = g.reshape(self.k, -1)
            d = flat[0].mul_(first).addmv_(flat[1:].T, rest)
            p.grad = d.view_as(p) if d.dtype == p.dtype else d.view_as(p).to(p.dtype)
        self.reset()
        return FairStep(weights, gram, active)
