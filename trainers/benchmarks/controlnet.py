"""``python -m trainers bench controlnet``: a fair ControlNet step against the plain sum, side by
side in one run, on the tiny SDXL-shaped UNet with a ControlNet made from it (``from_unet``).

The steps are ``fairhuman``'s (plain, floor = forward + K backward passes, batched, mpd,
mpd-loop, reference), on the ControlNet's parameters instead of a LoRA's. The ControlNet's zero
convolutions are moved off zero first (seeded), as after some training: at exactly zero no
gradient reaches the layers behind them and the backward passes would be unrepresentatively cheap.
"""
from __future__ import annotations

import argparse

import torch

from core.objectives import regional_losses
from core.tiny_models import build_tiny_pipeline

from ..trainables import ControlNetTrainable
from .fairhuman import measure_steps, print_ratios, step_inputs
from .measure import mib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--batch", type=int, default=2, help="batch size")
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def _setup(batch: int, latent: int):
    unet = build_tiny_pipeline("tiny-sdxl").unet
    unet.requires_grad_(False)
    trainable = ControlNetTrainable()
    trainable.attach(unet, torch.float32, gradient_checkpointing=False)
    params = trainable.parameters()
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 1e-3)
    inputs, noise, face, hand = step_inputs(unet, batch, latent)  # the fairhuman bench's batch
    condition = torch.rand(batch, 3, latent * 8, latent * 8, generator=torch.Generator().manual_seed(1))

    def losses():
        extra = trainable.unet_kwargs(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                                      inputs["added_cond_kwargs"], condition)
        return regional_losses(unet(**inputs, **extra).sample, noise, face, hand)

    return params, losses


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    params, losses = _setup(args.batch, args.latent)
    fns, times, peaks = measure_steps(params, losses, args.steps)
    count = sum(p.numel() for p in params)
    print(f"tiny SDXL-shaped UNet + ControlNet ({count:,} trained parameters), batch {args.batch}, "
          f"{args.latent}x{args.latent} latents, CPU {args.threads} threads, median of {args.steps} interleaved "
          f"rounds after 2 warm-up\n")
    print("| step | time (ms) | time / plain | peak MiB | peak / plain |")
    print("|---|---|---|---|---|")
    for name in fns:
        print(f"| {name} | {times[name] * 1e3:.0f} | {times[name] / times['plain']:.2f} | {mib(peaks[name])} | "
              f"{peaks[name] / peaks['plain']:.2f} |")
    print_ratios(times)
    return 0
