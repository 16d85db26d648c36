"""FairHuman's ControlNet scenario: the same three objectives and fair combination as
``fairhuman``, trained into a ControlNet (initialized from the base UNet, base frozen) that reads
each record's condition image — an OpenPose-style render from ``annotate --pose``, or the user's.

Condition dropout: each sample's condition is replaced by a black image (what "no pose" renders
as) with probability ``condition_dropout`` (paper: 0.3), drawn from the micro-batch's generator —
seeded by (seed, step, micro, rank) like the noise — so a resumed run drops the same samples.

The reference code's ControlNet variant hands an already consumed parameter generator to its
fairness step, so it trains on the plain sum; here the loop's combiner gets the ControlNet's
parameter list from the trainable, like a LoRA's.
"""
from __future__ import annotations

import torch

from ..data import read_records
from .fairhuman import FairHuman


def dropped(count: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """(count,) bool: which samples lose their condition this micro-batch."""
    return torch.rand(count, generator=generator) < rate


class FairHumanControlNet(FairHuman):
    name = "fairhuman-controlnet"
    trainable_kind = "controlnet"
    conditions = True
    # Paper: lr 1e-5, condition dropout 0.3. No flips: a mirrored pose would swap the colours
    # that tell the left limbs from the right.
    defaults = dict(lr=1e-5, resolution=1024, batch_size=1, flip_p=0.0, condition_dropout=0.3)

    @classmethod
    def check_data(cls, cfg) -> None:
        super().check_data(cfg)
        lacking = [r.image.name for r in read_records(cfg.data) if r.condition is None or not r.condition.is_file()]
        if lacking:
            shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
            raise ValueError(f"{len(lacking)} image(s) have no condition image ({shown}): run "
                             f"`python -m trainers annotate {cfg.data} --pose`, or put your own condition as "
                             "masks/<image stem>_condition.png and annotate again")

    def condition(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        images = batch["condition"]
        keep = ~dropped(images.shape[0], self.cfg.condition_dropout, generator)
        return (images * keep.view(-1, 1, 1, 1).to(images.dtype)).to(self.model.device)

    def summary(self) -> dict:
        return {**super().summary(), "condition_dropout": self.cfg.condition_dropout}


METHOD = FairHumanControlNet
