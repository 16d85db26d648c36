"""``python -m trainers bench lan``: LAN sampling vs. plain sampling of the same LoRA model.

Both on one tiny pipeline with a LoRA, same prompt, seed, steps and size: *plain* is one
sampling with the LoRA; *LAN* is the reference pass (LoRA off, statistics recorded) plus the
tuned pass (statistics matched after every step). The time floor is 2× (two trajectories); the
memory should not grow, since the reference is the same UNet with its adapter switched off and
only per-step channel statistics are kept.
"""
from __future__ import annotations

import argparse

import torch

from ..config import LORA_TARGETS
from .measure import interleaved_medians, mib, peak_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="tiny-sdxl", choices=["tiny-sd15", "tiny-sdxl"], help="tiny model")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--size", type=int, default=128, help="image side")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    from peft import LoraConfig

    from core.tiny_models import build_tiny_pipeline
    from trainers.sample import lan_generate

    torch.set_num_threads(args.threads)
    pipe = build_tiny_pipeline(args.base)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                     target_modules=list(LORA_TARGETS)), adapter_name="lora")
    common = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="latent")

    def plain():
        pipe("a photo of hands", generator=torch.Generator().manual_seed(0), **common)

    def lan():
        lan_generate(pipe, "a photo of hands", seed=0, strength=1.0, **common)

    times = interleaved_medians({"plain": plain, "lan": lan}, args.rounds, warmup=1)
    peaks = {"plain": peak_bytes(plain), "lan": peak_bytes(lan)}
    print(f"{args.base}, {args.size}x{args.size}, {args.steps} steps, CPU {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| sampling | time (s) | time / plain | peak MiB | peak / plain |")
    print("|---|---|---|---|---|")
    for name in ("plain", "lan"):
        print(f"| {name} | {times[name]:.2f} | {times[name] / times['plain']:.2f} | {mib(peaks[name])} | "
              f"{peaks[name] / peaks['plain']:.3f} |")
    return 0
