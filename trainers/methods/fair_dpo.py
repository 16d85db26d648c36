"""Fair DPO (``--method fair-dpo``): HG-DPO's Diffusion-DPO loss taken three times — over the
whole latent, and over each image's face and hand masks — as three objectives combined by the
fair combiner (MPD by default; any ``--weighting``).

Why: a whole-image preference gives faces and hands, a few percent of the pixels, almost no say
(HG-DPO's limitation B.2); FairHuman's answer to that imbalance is regional objectives with a
fair weighting of their gradients. Everything else is HG-DPO's: the pairs, the data path, the
shared noise and timestep, the reference (the adapter switched off), the fixed-probe evaluation.

Each image's regional error is taken over its own masks (``core.dpo.masked_per_sample_error``:
area-normalized, so a region's reward has the whole image's scale and, with full masks, all
three losses are the plain DPO loss). A region absent from both images of a pair leaves that
pair out of that region's loss; a region absent from the whole batch makes its objective
inactive (weight 0 that step).

The statistic-matching loss (× λ_stat) is added to the *global* objective, not made a fourth.
It is a constraint tying the tuned model's latent statistics to the reference's, not a
preference competing for a share of the update, and MPD would treat it badly as one: its
gradient is exactly 0 at the start (the tuned model is the reference) and small whenever the
constraint holds, and under MPD an objective's share of the update *grows* as its gradient
shrinks (w_j |g_j| ∝ |g_j|^(−1/3) at α = 2; ``tests/test_fair_dpo.py`` checks this), so a
satisfied constraint would be pushed hardest. In the global objective it keeps HG-DPO's fixed
relative weight λ_stat.
"""
from __future__ import annotations

import sys

import torch

from core.dpo import regional_dpo_losses
from core.masks import to_latent

from ..build_pairs import annotate_pairs
from .base import StepLosses
from .hg_dpo import HGDPO, REGIONS, pair_masks, stat_objective, tuned_and_reference


class FairDPO(HGDPO):
    name = "fair-dpo"
    objective_names = ("global", *REGIONS)
    combine = "fair"

    def __init__(self, cfg, model):
        # a pairs folder built before build-pairs stored masks is annotated on first use
        annotated = annotate_pairs(cfg.data)
        if annotated:
            print(f"fair-dpo: detected faces and hands of {annotated} pairs in {cfg.data} (masks/)", file=sys.stderr)
        super().__init__(cfg, model)
        for region in REGIONS:
            if not any(entry.get(f"{region}s") for pair in self.pairs for entry in pair["masks"].values()):
                print(f"fair-dpo: warning: no pair of {cfg.data} has a detected {region}, so the {region} objective "
                      f"stays inactive; build the pairs with a lower --mask-confidence (a young model's samples "
                      f"hold no confident {region}) or from a model that draws them", file=sys.stderr)

    def batch(self, step: int, micro: int) -> dict:
        batch = super().batch(step, micro)
        size = tuple(batch["winner"].shape[-2:])
        # (n, 2 images, R regions, H, W), resized like the pixels HG-DPO's data path returned
        batch["masks"] = torch.stack([pair_masks(self.folder, self.pairs[i], size) for i in batch["index"]])
        return batch

    def objectives(self, noisy, t, target, cond, time_ids, n: int, batch: dict) -> StepLosses:
        model = self.model
        pred, ref_pred = tuned_and_reference(model, noisy, t, cond, time_ids)
        masks = torch.cat([batch["masks"][:, 0], batch["masks"][:, 1]])  # winners then losers
        masks = model.loss_masks(to_latent(masks, tuple(noisy.shape[-2:])).to(pred.device))  # Flux: token grid
        losses, active, regional = regional_dpo_losses(pred, ref_pred, target, masks, self.beta)
        stat = stat_objective(model, noisy, t, pred, ref_pred, n, self.cfg.stat_reduction)
        metrics = {"dpo_loss": losses[0].detach(), "stat_loss": stat.detach(),
                   "reward_margin": regional[0]["reward_margin"], "accuracy": regional[0]["accuracy"]}
        for name, loss, m in zip(REGIONS, losses[1:], regional[1:]):
            metrics.update({f"{name}_loss": loss.detach(), f"{name}_margin": m["reward_margin"],
                            f"{name}_accuracy": m["accuracy"], f"{name}_pairs": m["pairs"]})
        losses = torch.cat([(losses[0] + self.cfg.lambda_stat * stat)[None], losses[1:]])
        return StepLosses(losses, active, metrics=metrics)

    def summary(self) -> dict:
        return {**super().summary(), "weighting": self.cfg.weighting, "stat_loss": "added to the global objective"}


METHOD = FairDPO
