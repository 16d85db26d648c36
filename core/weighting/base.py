"""The one contract every weighting follows (TorchJD's shape: a weighting maps statistics of
the objective gradients to weights; the Gramian is built elsewhere and the weights applied
elsewhere).

``weights = weighting(gram, losses, generator=None, active=None)``:
- ``gram`` (k, k) fp32: the Gramian of the gradients of the step's k *active* objectives;
- ``losses`` (k,): their detached losses;
- ``generator``: the step's generator (the only randomness a weighting may use, so a resumed
  run draws the same);
- ``active``: which of the ``objectives`` the weighting was made for those k rows are (indices;
  ``None``: all of them, k == objectives). Only weightings with per-objective state (fixed
  weights, loss history, learned log-variances) need it, to keep that state on its objective
  when, say, an image has no hand;
- returns (k,) weights in ``gram``'s dtype and on its device.

State: ``state_dict()`` / ``load_state_dict()`` hold everything a training checkpoint must
keep (plain tensors and lists: the checkpoint is loaded with ``weights_only=True``);
``parameters()`` lists learnable tensors the training optimizer steps (their ``.grad`` is set
by the call).

The class attributes state the laws the shared property suite
(``tests/test_weighting_properties.py``) checks on every registered weighting:
``symmetric`` (permuting the objectives permutes the weights), ``non_negative``,
``non_conflicting`` (K w > 0: the update d = Σ w_i g_i has a positive inner product with
every objective's gradient), ``gram_power`` (w(s K) = s^gram_power w(K)) and ``loss_power``
(w(K, c L) = c^loss_power w(K, L)).
"""
from __future__ import annotations

import torch

# Vanishing objectives: a weighting never sees a squared gradient norm (a Gramian diagonal entry)
# or a loss below this fraction of the step's largest (``core.combine`` states the guarantee).
VANISHING_FLOOR = 1e-6


def floor_vanishing(values: torch.Tensor) -> torch.Tensor:
    """``values`` (non-negative, squared-norm-like) floored at ``VANISHING_FLOOR`` × their
    maximum: unchanged where every entry is above it; scale-free (floor(c v) = c floor(v))."""
    return torch.maximum(values, VANISHING_FLOOR * values.max().clamp_min(0))


class Weighting:
    symmetric = True
    non_negative = True
    non_conflicting = False
    gram_power = 0.0
    loss_power = 0.0

    def __init__(self, objectives: int = 3):
        if int(objectives) < 1:
            raise ValueError(f"a weighting needs at least one objective, got {objectives}")
        self.objectives = int(objectives)

    def __call__(self, gram: torch.Tensor, losses: torch.Tensor, generator: torch.Generator | None = None,
                 active=None) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")

    def parameters(self) -> list[torch.Tensor]:
        return []

    def rows(self, k: int, active) -> torch.Tensor:
        """The indices, among ``objectives``, of the k objectives of this call."""
        if active is None:
            if k != self.objectives:
                raise ValueError(f"{type(self).__name__} was made for {self.objectives} objectives, got {k} "
                                 "without active= naming which")
            return torch.arange(k)
        rows = torch.as_tensor(active).flatten().cpu()
        if rows.dtype == torch.bool:
            rows = torch.nonzero(rows).flatten()
        if rows.numel() != k or (rows.numel() and int(rows.max()) >= self.objectives):
            raise ValueError(f"active={rows.tolist()} does not name {k} of {self.objectives} objectives")
        return rows.long()
