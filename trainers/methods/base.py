"""The interface between the shared training loop and a method."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepLosses:
    """A micro-batch's objectives. ``losses`` is (K,) in ``objective_names`` order; an inactive
    objective (e.g. no hand in the batch) has weight 0 this step. ``metrics`` are extra numbers
    for the event log (DPO reward margin, accuracy, ...)."""

    losses: torch.Tensor
    active: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)


class Method:
    name: str = ""
    objective_names: tuple[str, ...] = ()
    combine: str = "sum"  # "fair" or "sum"
    defaults: dict = {}

    @classmethod
    def check_data(cls, cfg) -> None:
        """Refuse (ValueError / FileNotFoundError with a message naming the files and the fix)
        a dataset this method cannot train on, before any model loads."""

    @classmethod
    def texts(cls, cfg) -> list[str]:
        """Every text the method conditions on over a run (its dataset's captions or prompts), read
        before any model loads: ``--unload-text-encoders`` encodes them up front."""
        raise NotImplementedError

    def __init__(self, cfg, model):
        self.cfg, self.model = cfg, model
        # set by the loop: each process trains on its own share of every step's batches
        self.rank, self.world = 0, 1

    def batch_number(self, step: int, micro: int) -> int:
        """The global index of this process's micro-batch ``micro`` of optimizer step ``step``."""
        return (step * self.cfg.grad_accum + micro) * self.world + self.rank

    def sum_weights(self) -> torch.Tensor:
        """Fixed weights of the objectives when ``combine == "sum"``."""
        return torch.ones(len(self.objective_names))

    def batch(self, step: int, micro: int) -> dict:
        raise NotImplementedError

    def losses(self, batch: dict, generator: torch.Generator) -> StepLosses:
        raise NotImplementedError

    def dataset_size(self) -> int:
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Numbers measured the same way at every call (fixed data and noise), so the change
        between two calls is the training's; {} when the method has none."""
        return {}

    def summary(self) -> dict:
        """Method-specific facts for the LoRA metadata."""
        return {}
