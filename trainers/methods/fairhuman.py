"""FairHuman: global, face-masked and hand-masked diffusion losses from one denoiser forward,
combined by a fairness weighting of their gradients (MPD by default). The prediction, its target
and the grid the masks are pooled to are the model family's (``core.families``)."""
from __future__ import annotations

from pathlib import Path

import torch

from core.objectives import regional_losses

from ..cache import TensorCache
from ..data import RegionDataset, StepBatches, check_records, collate, read_records
from .base import Method, StepLosses


class FairHuman(Method):
    name = "fairhuman"
    objective_names = ("global", "face", "hand")
    combine = "fair"
    # Paper defaults for an SDXL LoRA: rank 256, lr 1e-5, 1024 px, batch 1, Adam.
    defaults = dict(rank=256, lr=1e-5, resolution=1024, batch_size=1)
    conditions = False  # the ControlNet variant also reads each record's condition image

    @classmethod
    def check_data(cls, cfg) -> None:
        check_records(cfg.data)

    @classmethod
    def texts(cls, cfg) -> list[str]:
        return [record.text for record in read_records(cfg.data)]

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.dataset = RegionDataset(
            cfg.data, resolution=cfg.resolution, seed=cfg.seed, random_crop=cfg.random_crop,
            flip_p=cfg.flip_p, bucketing=cfg.bucketing, conditions=self.conditions,
        )
        self.order = StepBatches(self.dataset.bucket_of, cfg.batch_size, cfg.seed)
        self.latent_cache = None
        if cfg.cache_latents:
            if cfg.random_crop:
                raise ValueError("--cache-latents needs --random-crop false: a random crop changes every latent")
            self.latent_cache = TensorCache(Path(cfg.output) / "cache" / "latents")

    def dataset_size(self) -> int:
        return len(self.dataset)

    def batch(self, step: int, micro: int) -> dict:
        epoch, indices = self.order.batch(self.batch_number(step, micro))
        return collate([self.dataset.item(i, epoch) for i in indices])

    def _moments(self, batch: dict) -> torch.Tensor:
        # One image at a time: a latent never depends on its batch-mates, cached or not.
        def encode(i):
            return self.model.latent_moments(batch["pixels"][i: i + 1])[0]

        if self.latent_cache is None:
            return torch.stack([encode(i) for i in range(len(batch["view"]))])
        return torch.stack([self.latent_cache.get_or_compute(view, lambda i=i: encode(i))
                            for i, view in enumerate(batch["view"])]).to(self.model.device)

    def losses(self, batch: dict, generator: torch.Generator) -> StepLosses:
        model = self.model
        latents = model.sample_latents(self._moments(batch), generator)
        noise, timesteps = model.sample_noise_and_timesteps(latents, generator)
        noisy = model.add_noise(latents, noise, timesteps)
        pred = model.predict(noisy, timesteps, model.conditioning(batch["text"]), batch["time_ids"],
                             self.condition(batch, generator))
        target = model.target(latents, noise, timesteps)
        masks = model.loss_masks(batch["latent_masks"].to(pred.device))
        losses, active = regional_losses(
            pred, target, masks[:, 0:1], masks[:, 1:2], normalization=self.cfg.normalization,
            local_scale=self.cfg.local_scale,
        )
        return StepLosses(losses, active)

    def condition(self, batch: dict, generator: torch.Generator):
        """The ControlNet's condition images of a micro-batch; None: nothing to condition."""
        return None

    def summary(self) -> dict:
        return {"weighting": self.cfg.weighting, "normalization": self.cfg.normalization,
                "local_scale": self.cfg.local_scale}

METHOD = FairHuman
