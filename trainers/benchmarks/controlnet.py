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
from .fairhuman import measure_steps
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
    g = torch.Generator().manual_seed(0)
    side = latent * 8
    lat = torch.randn(batch, 4, latent, latent, generator=g)
    noise = torch.randn(batch, 4, latent, latent, generator=g)
    condition = torch.rand(batch, 3, side, side, generator=g)
    face = torch.zeros(batch, 1, latent, latent)
    face[:, :, latent // 8: latent // 3, latent // 4: latent // 2] = 1
    hand = torch.zeros(batch, 1, latent, latent)
    hand[:, :, -latent // 4: -latent // 8, -latent // 5: -latent // 10] = 1
    cross = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    hidden = torch.randn(batch, 77, cross, generator=g)
    added = {"text_embeds": torch.randn(batch, pooled, generator=g),
             "time_ids": torch.tensor([[side * 1.0, side, 0, 0, side, side]] * batch)}
    t = torch.tensor([500] * batch)

    def losses():
        noisy = lat + noise
        extra = trainable.unet_kwargs(noisy, t, hidden, added, condition)
        pred = unet(noisy, t, encoder_hidden_states=hidden, added_cond_kwargs=added, **extra).sample
        return regional_losses(pred, noise, face, hand)

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
    floor = times["floor"] / times["plain"]
    print(f"| **mpd / floor** | | {times['mpd'] / times['floor']:.3f} (floor / plain {floor:.2f}) | | |")
    if "mpd-loop" in times:
        print(f"| **mpd-loop / floor** | | {times['mpd-loop'] / times['floor']:.3f} | | |")
    print(f"| **reference / mpd** | | {times['reference'] / times['mpd']:.2f} | | |")
    return 0
