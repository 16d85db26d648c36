"""One ``bench fairness`` run: a tiny pixel-space denoiser trained on synthetic scenes with the
pack's own three objectives (``core.objectives.regional_losses``), combined by the pack's own
combiner and weightings (``core.combine.FairCombiner``), then measured on held-out scenes.

The denoiser is a five-layer convolutional ε-predictor (about 2k parameters) with its output
layer at zero, so every run starts from the prediction 0 and the same error. Noise follows the
cosine schedule ᾱ(t) = cos²(πt/2) over its low-to-mid-noise half (t ≤ ``T_MAX``: at higher
noise every region's error falls alike, by learning that the input is mostly noise, which
hides the regional differences this bench exists to show); training draws t uniformly there,
the held-out measure uses fixed probes (timesteps spread over it, seeded noise). No clipping and no LR schedule: the
optimizer and its learning rate are the only things besides the weighting, so the two controls
(each weighting at its best AdamW learning rate; every update rescaled to the plain sum's norm
under SGD) compare directions, not incidental settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .fairness_scenes import draw_scenes

REGIONS = ("global", "face", "hand")
HELD_OUT_SEED = 1_000_003  # the held-out scenes and probe noise: the same for every run
T_MAX = 0.5  # timesteps in [0, T_MAX]: ᾱ from 1 to 0.5, where fine detail is denoised
TRAINING_SCENES = 512  # each run's training set, drawn from its seed


@dataclass
class RunSettings:
    overrides: dict  # weighting, weighting_options, normalization, local_scale
    optimizer: str  # adamw | sgd
    lr: float
    match_norm: bool
    steps: int
    batch: int
    seed: int


class TinyDenoiser(nn.Module):
    """ε-prediction from the noisy image and a constant timestep channel."""

    def __init__(self, width: int = 8):
        super().__init__()
        def block(inputs: int, dilation: int = 1) -> list[nn.Module]:
            # per-channel normalization: without it plain SGD finds no learning rate that both
            # trains and stays stable here (the hidden features' common mode is far sharper
            # than the directions that denoise)
            return [nn.Conv2d(inputs, width, 3, padding=dilation, dilation=dilation),
                    nn.GroupNorm(width, width), nn.SiLU()]

        self.net = nn.Sequential(*block(4), *block(width), *block(width, 2), *block(width), nn.Conv2d(width, 3, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tmap = t.view(-1, 1, 1, 1).expand(-1, 1, *noisy.shape[-2:])
        return self.net(torch.cat([noisy, tmap], dim=1))


def noised(images: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    alpha_bar = torch.cos(t * math.pi / 2).pow(2).view(-1, 1, 1, 1)
    return alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise


def held_out(count: int, probes: int) -> dict:
    """Held-out scenes × probe timesteps, with their noise: every run is measured on these."""
    generator = torch.Generator().manual_seed(HELD_OUT_SEED)
    images, face, hand = draw_scenes(generator, count)
    t = ((torch.arange(probes) + 0.5) / probes * T_MAX).repeat(count)
    images, face, hand = (x.repeat_interleave(probes, 0) for x in (images, face, hand))
    noise = torch.randn(images.shape, generator=generator)
    return {"noisy": noised(images, noise, t), "t": t, "noise": noise, "face": face, "hand": hand}


@torch.no_grad()
def regional_errors(model: TinyDenoiser, probe: dict) -> torch.Tensor:
    """Per region (global, face, hand), the area-normalized MSE of the predicted noise."""
    from core.objectives import regional_losses

    pred = model(probe["noisy"], probe["t"])
    losses, _ = regional_losses(pred, probe["noise"], probe["face"], probe["hand"], normalization="area")
    return losses


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """AdamW as the training loop builds it (weight decay 1e-2), or plain SGD (no momentum: the
    update is lr × d, so a rescaled d is a rescaled step)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: adamw or sgd")


def train_and_measure(settings: RunSettings, probe: dict) -> dict:
    """Train one run and measure it: each region's relative error reduction (%) on the held-out
    probes and each objective's mean share of the update over the run."""
    from core.combine import FairCombiner
    from core.objectives import regional_losses
    from core.weighting import get_weighting

    o = settings.overrides
    torch.manual_seed(settings.seed)
    model = TinyDenoiser()
    before = regional_errors(model, probe)
    params = list(model.parameters())
    weighting = get_weighting(o["weighting"], len(REGIONS), **o.get("weighting_options", {}))
    combiner_options = {"match_norm": True} if settings.match_norm else {}
    # K backward passes: faster than the batched product on a model this small
    combiner = FairCombiner(params, weighting, len(REGIONS), batched=False, **combiner_options)
    optimizer = make_optimizer(settings.optimizer, params + weighting.parameters(), settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    pool = draw_scenes(generator, TRAINING_SCENES)
    shares = torch.zeros(len(REGIONS))
    for step in range(settings.steps):
        pick = torch.randint(0, TRAINING_SCENES, (settings.batch,), generator=generator)
        images, face, hand = (x[pick] for x in pool)
        t = torch.rand(settings.batch, generator=generator) * T_MAX
        noise = torch.randn(images.shape, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        losses, active = regional_losses(model(noised(images, noise, t), t), noise, face, hand,
                                         normalization=o.get("normalization", "reference"),
                                         local_scale=o.get("local_scale", 5.0))
        combiner.add(losses, active)
        shares += combiner.step(generator).shares.cpu()
        optimizer.step()
    after = regional_errors(model, probe)
    reduction = ((before - after) / before * 100).tolist()
    return {"reduction": dict(zip(REGIONS, reduction)), "shares": (shares / settings.steps).tolist()}
