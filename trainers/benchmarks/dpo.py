"""``python -m trainers bench dpo``: peak memory (and time) of a Diffusion-DPO step against a
plain LoRA step on the same 2B batch.

Both on the tiny SD1.5-shaped UNet with a rank-8 LoRA: *plain* is one forward and backward of
the diffusion loss on 2B latents; *dpo* is the HG-DPO step on B pairs (= 2B latents): the
reference forward without gradients (the same UNet, adapter off — no second copy), then the
tuned forward and backward of the DPO + statistic-matching loss; *fair-dpo* is the fair-dpo
step on the same pairs: the same two forwards, the DPO loss over the whole latent and over each
image's face and hand masks, one batched vector-Jacobian product for the three gradients, the
Gramian, MPD and d into ``.grad`` (``core.combine.FairCombiner``); *fair-dpo-loop* the same with
three backward passes (``--batched-vjp false``). Peak = live tensor bytes
during the step (``measure.TensorMemory``). Targets: dpo / plain ≤ 1.15, fair-dpo / dpo ≤ 1.15.
"""
from __future__ import annotations

import argparse

import torch

from .measure import interleaved_medians, mib, peak_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=2, help="B: pairs per step (the plain step gets 2B images)")
    parser.add_argument("--latent", type=int, default=32, help="latent side")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def plain_and_dpo_steps(model, n: int, side: int, device="cpu"):
    """A fixed batch of n pairs (2n latents of side²) and its two steps: plain (the diffusion loss
    on the 2n latents) and dpo (HG-DPO's step on the n pairs). Returns (batch, zero, plain, dpo);
    batch holds noisy, t, noise, cond, params."""
    from trainers.methods.hg_dpo import dpo_objectives

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * n, 4, side, side, generator=g).to(device)
    noise = torch.randn(n, 4, side, side, generator=g).repeat(2, 1, 1, 1).to(device)
    t = torch.randint(0, 1000, (n,), generator=g).repeat(2).to(device)
    batch = dict(noisy=model.add_noise(latents, noise, t), t=t, noise=noise,
                 cond=model.conditioning(["a photo of hands"] * (2 * n)), params=model.trainable.parameters())

    def zero():
        for p in batch["params"]:
            p.grad = None

    def plain():
        zero()
        ((model.predict(batch["noisy"], t, batch["cond"]) - noise) ** 2).mean().backward()

    def dpo():
        zero()
        loss, stat, _ = dpo_objectives(model, batch["noisy"], t, noise, batch["cond"], None, n, 2500.0)
        (loss + 10000.0 * stat).backward()

    return batch, zero, plain, dpo


def run(args: argparse.Namespace) -> int:
    from core.combine import FairCombiner
    from core.dpo import regional_dpo_losses
    from core.tiny_models import build_tiny_pipeline
    from core.weighting import get_weighting
    from trainers.methods.hg_dpo import stat_objective, tuned_and_reference
    from trainers.model import TrainableModel

    torch.set_num_threads(args.threads)
    model = TrainableModel(build_tiny_pipeline("tiny-sd15"), rank=8)
    n, side = args.pairs, args.latent
    batch, zero, plain, dpo = plain_and_dpo_steps(model, n, side)
    noisy, t, noise, cond, params = (batch[k] for k in ("noisy", "t", "noise", "cond", "params"))

    # each image's face (a quarter) and hand (a small square, absent from the first loser)
    masks = torch.zeros(2 * n, 2, side, side)
    masks[:, 0, : side // 2, : side // 2] = 1
    masks[:, 1, -side // 4:, side // 2: side // 2 + side // 8] = 1
    masks[n, 1] = 0
    combiners = {batched: FairCombiner(params, get_weighting("mpd", 3), 3, batched=batched)
                 for batched in (True, False)}

    def fair_dpo(batched=True):
        zero()
        combiner = combiners[batched]
        pred, ref_pred = tuned_and_reference(model, noisy, t, cond, None)
        losses, active, _ = regional_dpo_losses(pred, ref_pred, noise, masks, 2500.0)
        stat = stat_objective(model, noisy, t, pred, ref_pred, n)
        combiner.add(torch.cat([(losses[0] + 10000.0 * stat)[None], losses[1:]]), active)
        combiner.step()

    steps = {"plain": plain, "dpo": dpo, "fair-dpo": fair_dpo, "fair-dpo-loop": lambda: fair_dpo(False)}
    times = interleaved_medians(steps, args.rounds)
    peaks = {name: peak_bytes(fn) for name, fn in steps.items()}
    print(f"tiny SD1.5-shaped UNet, LoRA rank 8, {2 * n} latents of {side}x{side}, CPU {args.threads} threads\n")
    print("| step | time (ms) | time / plain | time / dpo | peak MiB | peak / plain | peak / dpo |")
    print("|---|---|---|---|---|---|---|")
    for name in steps:
        print(f"| {name} | {times[name] * 1e3:.0f} | {times[name] / times['plain']:.2f} | "
              f"{times[name] / times['dpo']:.2f} | {mib(peaks[name])} | {peaks[name] / peaks['plain']:.3f} | "
              f"{peaks[name] / peaks['dpo']:.3f} |")
    return 0
