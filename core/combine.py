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

Matched norm (``match_norm``, off by default): d is rescaled to the norm of the plain summed
loss's update Σ g_i over the step's active objectives, its direction unchanged. The scale is
applied to the weights (w ← w · ‖Σ g_i‖ / ‖Σ w_i g_i‖, both norms read off the Gramian), so it
costs nothing per parameter and the weights an event reports are the ones applied. It separates
a weighting's direction from its step size (MPD's weights are not normalized: its d is not on
the plain loss's scale).

Vanishing objectives (the guarantee): the weighting never sees an active objective's gradient
smaller than ``VANISHING_FLOOR``^½ = 1e-3 times the step's largest — the Gramian it is handed has
its diagonal floored at 1e-6 · max_i K_ii (off-diagonal entries kept, so it stays positive
semi-definite); ``si``, which reads losses instead, floors them at 1e-6 · max_i L_i the same way
(``core.weighting.base.floor_vanishing``). So as one objective's gradient g_j → 0 (a hand loss
of 5e-6 under exact MPD gets a weight of 2e7, and its part ‖w_j g_j‖ = ‖g_j‖^(-1/3) grows
without bound for orthogonal gradients):
- its weight stays at most what a gradient of norm 1e-3 · max‖g_i‖ gets, and its part w_j g_j
  of the update goes to 0 with g_j, continuously (its share of d vanishes instead of taking
  all of it);
- under MPD with orthogonal gradients no objective's part exceeds (1e-6)^(-1/6) = 10 × the
  part of the largest-gradient objective, so ‖d‖ ≤ 10 K × that part;
- while every active objective's gradient norm is at least 1e-3 × the largest, the weighting
  sees the true Gramian and MPD is exact. The Gramian reported (``FairStep.gram``, the shares,
  the gradient norms) is always the true one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .weighting.base import floor_vanishing


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


def floored_gram(gram: torch.Tensor) -> torch.Tensor:
    """``gram`` with its diagonal floored at ``VANISHING_FLOOR`` × its largest diagonal entry:
    what the weighting sees (the vanishing-objective guarantee, module docstring)."""
    diag = torch.diagonal(gram)
    return gram + torch.diag(floor_vanishing(diag) - diag)


def matched_norm(weights: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``weights`` rescaled so ‖Σ w_i g_i‖ = ‖Σ g_i‖ (norms from the Gramian ``gram`` of the same
    g_i); unchanged when the combination is zero. No host read."""
    w = weights.to(gram)
    combined = w @ gram @ w
    factor = (gram.sum().clamp_min(0) / combined).sqrt()
    return torch.where(combined > 0, w * factor, w).to(weights)


def fair_weights(weighting, gram: torch.Tensor, losses: torch.Tensor, generator: torch.Generator | None = None,
                 active=None, match_norm: bool = False) -> torch.Tensor:
    """The weights of the active objectives' Gramian ``gram`` (true, unscaled): the weighting
    applied to the floored Gramian, then, with ``match_norm``, rescaled to the plain sum's norm."""
    weights = weighting(floored_gram(gram), losses, generator=generator, active=active)
    return matched_norm(weights, gram) if match_norm else weights


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
    """Turns each optimizer step's K objective losses into ``.grad``, on its schedule.

    The step: ``begin(step)``, ``backward(losses, …)`` per micro-batch, ``finish(generator)``
    (``.grad`` complete), and ``commit()`` once the optimizer applied it. ``state_dict`` holds
    what a checkpoint must keep (the weighting's state and the last solved weights).

    Amortized fairness (``every`` = N > 1, ``--fair-every``): the weights are solved from the
    per-objective gradients on every N-th step only (and on the first); on the steps between,
    one backward of Σ w_i L_i with the last solved weights gives exactly d = Σ w_i g_i for those
    weights at the cost of a plain step — nothing else runs on those steps (no host read, no
    conversion: the weights are cast once per solve). A weighting's own state (DWA's loss
    history, UW's parameters) moves on solving steps only; with ``match_norm`` the steps between
    reuse the solve's rescaled weights.

    A solving step collects the per-objective gradients (``add``) and writes their fair
    combination (``step``). Gradients are held per parameter tensor as one (K, *shape) tensor —
    the layout the batched product returns — so the Gramian and the combination cost one matrix
    product each per parameter tensor, not K² small kernels.
    """

    def __init__(self, params: Sequence[torch.Tensor], weighting, objectives: int,
                 reduce: Callable[[list[torch.Tensor]], None] | None = None, batched: bool = True,
                 on_fallback: Callable[[str], None] | None = None, match_norm: bool = False, every: int = 1):
        self.params = [p for p in params if p.requires_grad]
        self.weighting, self.k, self.reduce, self.batched = weighting, objectives, reduce, batched
        self.match_norm = match_norm
        self.on_fallback = on_fallback
        self.fallback_reason: str | None = None
        self.every = max(1, int(every or 1))
        self.solving = True  # this step solves the weights (always, unless amortized)
        self.last_weights: torch.Tensor | None = None  # (K,) of the last applied solve, on the device
        self.solved: FairStep | None = None  # this step's solve, until the next begin
        self._cast: torch.Tensor | None = None  # last_weights in the losses' dtype and device
        self.reset()

    # ---- the schedule ------------------------------------------------------------------------
    def begin(self, step: int) -> None:
        """Before a step's micro-batches: whether it solves the weights."""
        self.solving = self.last_weights is None or step % self.every == 0
        self.solved = None

    def backward(self, losses: torch.Tensor, active: torch.Tensor | None = None,
                 loss_scale: float | torch.Tensor = 1.0) -> None:
        """One micro-batch's K losses (already multiplied by ``loss_scale``): collected on a
        solving step, else one backward of their sum weighted by the last solved weights."""
        if self.solving:
            self.add(losses, active, loss_scale)
            return
        if self._cast is None or self._cast.dtype != losses.dtype or self._cast.device != losses.device:
            self._cast = self.last_weights.to(losses)
        torch.dot(losses, self._cast).backward()

    def finish(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Complete ``.grad`` (in the losses' scaled domain) and return the weights it used."""
        if self.solving:
            self.solved = self.step(generator)
            return self.solved.weights
        if self.reduce is not None:  # a weighted sum: average the gradient over processes, as DDP would
            self.reduce([p.grad for p in self.params if p.grad is not None])
        return self.last_weights

    @property
    def shares(self) -> torch.Tensor | None:
        """Each objective's share of this step's update (a solving step's only)."""
        return None if self.solved is None else self.solved.shares

    def commit(self) -> None:
        """The step was applied: its solved weights serve the amortized steps that follow. An
        objective absent from this step's batch (no hand in it) keeps the weight of the last
        solve it was present in, rather than 0 until the next solve."""
        if self.solved is None:
            return
        weights = self.solved.weights.detach()
        if self.last_weights is not None:
            weights = torch.where(self.solved.active.to(weights.device), weights, self.last_weights.to(weights))
        self.last_weights, self._cast = weights, None

    def state_dict(self) -> dict:
        return {"weighting": self.weighting.state_dict(),
                "last_weights": None if self.last_weights is None else self.last_weights.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """``state_dict``'s keys; a checkpoint written before the schedule was kept has no
        ``last_weights`` (the next step then solves)."""
        if state.get("weighting"):
            self.weighting.load_state_dict(state["weighting"])
        last = state.get("last_weights")
        device = self.params[0].device if self.params else None
        self.last_weights, self._cast = (None if last is None else last.to(device)), None

    # ---- a solving step ----------------------------------------------------------------------

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
        weights[idx] = fair_weights(self.weighting, sub, losses[idx], generator=generator, active=rows,
                                    match_norm=self.match_norm).float().to(device)
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
