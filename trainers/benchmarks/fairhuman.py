"""``python -m trainers bench fairhuman``: the cost of a fair step, side by side in one run.

On a tiny base (``--base``: the SDXL-shaped UNet by default, or a flow transformer such as
``tiny-flux``) with a LoRA on the attention projections (as the trainer targets them on that
family), one batch, each step timed as the median of interleaved rounds after warm-up:

- plain:      forward, one backward of the summed loss (a plain LoRA step's gradient work);
- floor:      forward + K = 3 backward passes (what any exact per-objective method must do);
- batched:    forward + one batched 3-way vector-Jacobian product (``is_grads_batched``);
- mpd:        this pack's step (``core.combine.FairCombiner`` with exact MPD), batched product;
- mpd-loop:   the same with K backward passes (``--batched-vjp false``): less transient memory;
- reference:  the reference code's recipe, written from its description: three backward
              passes, a fresh fp32 params×3 buffer every step, the weights solved on the CPU
              with numpy least squares (a host round trip), the combined gradient written back.

Ratios are to the plain step. Peak memory is the peak of live tensor bytes during the step
(see ``measure.TensorMemory``), minus nothing: every variant starts from the same state.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from core.combine import FairCombiner
from core.tiny_models import TINY_BASES, build_tiny_pipeline
from core.objectives import regional_losses
from core.weighting import get_weighting

from ..config import LORA_TARGETS
from .measure import interleaved_medians, mib, peak_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="tiny-sdxl", choices=[b for b in TINY_BASES if b != "tiny-sd15"],
                        help="the tiny base to measure on: the SDXL-shaped UNet, or a flow transformer (its "
                             "family's objective, denoiser call, token-grid masks and LoRA targets)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="LoRA ranks to measure")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--batch", type=int, default=2, help="batch size")
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--fair-every", type=int, nargs="*", default=[4, 8, 16],
                        help="also the mean step cost of --fair-every N for these N (none: skip)")
    parser.add_argument("--amortized-only", action="store_true",
                        help="measure only the --fair-every table (plain, mpd and each N)")


def add_lora(unet, rank: int, targets=LORA_TARGETS) -> list[torch.nn.Parameter]:
    """A rank-``rank`` LoRA (fp32, gaussian init so every tensor gets a gradient) on the
    ``targets`` of a frozen denoiser (default: the attention projections); its parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(targets)))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def step_inputs_masks(batch: int, latent: int):
    """The generator after drawing them, 4-channel latents and noise, and the face and hand masks
    (a small face up left, a smaller hand down right) of the fixed batch."""
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(batch, 4, latent, latent, generator=g)
    noise = torch.randn(batch, 4, latent, latent, generator=g)
    face = torch.zeros(batch, 1, latent, latent)
    face[:, :, latent // 8: latent // 3, latent // 4: latent // 2] = 1
    hand = torch.zeros(batch, 1, latent, latent)
    hand[:, :, -latent // 4: -latent // 8, -latent // 5: -latent // 10] = 1
    return g, lat, noise, face, hand


def step_inputs(unet, batch: int, latent: int, device="cpu"):
    """A fixed SDXL batch on ``device``: UNet keyword arguments, the noise target, face and hand masks."""
    g, lat, noise, face, hand = step_inputs_masks(batch, latent)
    cross = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    inputs = dict(
        sample=lat + noise, timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, 77, cross, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g),
                           "time_ids": torch.tensor([[latent * 8.0, latent * 8, 0, 0, latent * 8, latent * 8]] * batch)},
    )
    move = lambda t: t.to(device)  # noqa: E731
    inputs = {k: ({kk: move(vv) for kk, vv in v.items()} if isinstance(v, dict) else move(v)) for k, v in inputs.items()}
    return inputs, move(noise), move(face), move(hand)


def _setup(rank: int, batch: int, latent: int, base: str = "tiny-sdxl"):
    if base != "tiny-sdxl":
        return _family_setup(base, rank, batch, latent)
    unet = build_tiny_pipeline("tiny-sdxl").unet
    params = add_lora(unet, rank)
    inputs, noise, face, hand = step_inputs(unet, batch, latent)

    def losses():
        pred = unet(**inputs).sample
        return regional_losses(pred, noise, face, hand)

    return unet, params, losses


def _family_setup(base: str, rank: int, batch: int, latent: int):
    """The same three losses on a tiny flow transformer, through its model family as the trainer
    has it: its noising at σ = 0.5, its target, its denoiser call, its masks on the token grid."""
    from core.families import family_of

    pipe = build_tiny_pipeline(base)
    family = family_of(pipe)
    params = add_lora(family.denoiser, rank, family.lora_targets(LORA_TARGETS))
    g = torch.Generator().manual_seed(0)
    shape = (batch, pipe.vae.config.latent_channels, latent, latent)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    timesteps = torch.full((batch,), 0.5)  # σ mid-way between data and noise
    noisy, target = family.add_noise(x0, noise, timesteps), family.target(x0, noise, timesteps)
    cond = family.encode_prompts(["a photo of a person waving"] * batch, torch.float32)
    *_, face, hand = step_inputs_masks(batch, latent)
    face, hand = family.loss_masks(torch.cat([face, hand], dim=1)).split(1, dim=1)

    def losses():
        pred = family.predict(noisy, timesteps, cond, None, None, None)
        return regional_losses(pred, target, face, hand)

    return family.denoiser, params, losses


def _reference_solve(gram: np.ndarray, alpha: float = 2.0, iterations: int = 20) -> np.ndarray:
    """(K w) = w^(-1/α) by least squares on the CPU: scipy's ``least_squares`` with w > 0, as the
    reference code does; a numpy fixed point where scipy is not installed."""
    try:
        from scipy.optimize import least_squares

        result = least_squares(lambda w: gram @ w - np.power(w, -1.0 / alpha), np.ones(gram.shape[0]),
                               bounds=(1e-12, np.inf))
        return result.x
    except ImportError:
        pass
    w = np.ones(gram.shape[0])
    for _ in range(iterations):
        w_new, *_ = np.linalg.lstsq(gram, np.power(np.maximum(w, 1e-12), -1.0 / alpha), rcond=None)
        w = np.maximum(0.5 * w + 0.5 * w_new, 1e-12)
    return w


def steps_for(params, losses, device="cpu"):
    """The measured steps (see the module docstring) for ``losses()`` -> (3 losses, active)."""
    combiner = FairCombiner(params, get_weighting("mpd"), 3, batched=True)
    looped = FairCombiner(params, get_weighting("mpd"), 3, batched=False)
    eye = torch.eye(3, device=device)

    def zero():
        for p in params:
            p.grad = None

    def plain():
        zero()
        values, _ = losses()
        values.sum().backward()

    def floor():
        zero()
        values, _ = losses()
        for i in range(3):
            torch.autograd.grad(values[i], params, retain_graph=i < 2)

    def batched():
        zero()
        values, _ = losses()
        torch.autograd.grad(values, params, grad_outputs=eye, is_grads_batched=True)

    def mpd():
        zero()
        values, active = losses()
        combiner.add(values, active)
        combiner.step()

    def mpd_loop():
        zero()
        values, active = losses()
        looped.add(values, active)
        looped.step()

    def reference():
        zero()
        values, _ = losses()
        numel = sum(p.numel() for p in params)
        buffer = torch.zeros(numel, 3, dtype=torch.float32, device=device)  # fresh every step, as the reference does
        for i in range(3):
            for p in params:
                p.grad = None
            values[i].backward(retain_graph=i < 2)
            buffer[:, i] = torch.cat([p.grad.reshape(-1).float() for p in params])
        gram = (buffer.T @ buffer).cpu().numpy()  # host round trip
        w = torch.from_numpy(_reference_solve(gram)).float().to(device)
        combined = buffer @ w
        offset = 0
        for p in params:
            p.grad = combined[offset: offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    return {"plain": plain, "floor": floor, "batched": batched, "mpd": mpd, "mpd-loop": mpd_loop,
            "reference": reference}


def print_ratios(times: dict, lead: str = "", tail: str = "") -> None:
    """The table's summary rows: MPD against the floor (the target), the loop and the reference;
    ``lead``/``tail``: the empty cells of the table's other columns."""
    floor = times["floor"] / times["plain"]
    print(f"{lead}| **mpd / floor** | | {times['mpd'] / times['floor']:.3f} (floor / plain {floor:.2f}) | |{tail} |")
    if "mpd-loop" in times:
        print(f"{lead}| **mpd-loop / floor** | | {times['mpd-loop'] / times['floor']:.3f} | |{tail} |")
    print(f"{lead}| **reference / mpd** | | {times['reference'] / times['mpd']:.2f} | |{tail} |")


def measure_steps(params, losses, rounds: int) -> tuple[dict, dict, dict]:
    """(steps, median seconds, peak bytes) of ``steps_for``'s steps, interleaved; the batched ones
    are left out where this torch cannot vmap a kernel's backward."""
    fns = steps_for(params, losses)
    try:
        fns["batched"]()
    except RuntimeError as err:  # vmap over backward is not supported by every kernel
        print(f"(batched VJP unavailable: {str(err).splitlines()[0][:80]})")
        fns.pop("batched")
        fns.pop("mpd-loop")
    times = interleaved_medians(fns, rounds)
    return fns, times, {name: peak_bytes(fn) for name, fn in fns.items()}


def amortized_steps(params, losses, every=(4, 8, 16)) -> dict:
    """``--fair-every N``: N consecutive steps of the combiner the loop holds (one solve, then
    N - 1 backward passes of the weighted sum with the solved weights), and beside each the same
    N consecutive plain steps, so both sides pay the same warm-up and loop; time / N is the mean
    step cost."""
    combiners = {n: FairCombiner(params, get_weighting("mpd"), 3, batched=True, every=n) for n in every}

    def fair(n):
        combiner = combiners[n]
        for step in range(n):
            for p in params:
                p.grad = None
            combiner.begin(step)
            values, active = losses()
            combiner.backward(values, active)
            combiner.finish()
            combiner.commit()

    def plain(n):
        for _ in range(n):
            for p in params:
                p.grad = None
            values, _ = losses()
            values.sum().backward()

    fns = {}
    for n in every:
        fns[f"plain {n}"] = lambda n=n: plain(n)
        fns[f"fair-every {n}"] = lambda n=n: fair(n)
    return fns


def _main_table(rank: int, params, losses, rounds: int) -> dict:
    """The rows of one rank's step table; its steps."""
    fns, times, peaks = measure_steps(params, losses, rounds)
    lora_bytes = sum(p.numel() * 4 for p in params)
    lora_params = sum(p.numel() for p in params)
    for name in fns:
        print(f"| {rank} | {lora_params:,} | {name} | {times[name] * 1e3:.0f} | "
              f"{times[name] / times['plain']:.2f} | {mib(peaks[name])} | "
              f"{mib(peaks[name] - peaks['plain'])} | {mib(2 * lora_bytes)} |")
    print_ratios(times, lead="|  |  ", tail=" |")
    return fns


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    what = "tiny SDXL-shaped UNet" if args.base == "tiny-sdxl" else f"{args.base} ({args.base[5:]}-shaped transformer)"
    print(f"{what}, batch {args.batch}, {args.latent}x{args.latent} latents, CPU "
          f"{args.threads} threads, median of {args.steps} interleaved rounds after 2 warm-up\n")
    amortized = []
    if not args.amortized_only:
        print("| rank | LoRA params | step | time (ms) | / plain | peak MiB | extra MiB vs plain | (K-1) x LoRA MiB |")
        print("|" + "---|" * 8)
    for rank in args.ranks:
        unet, params, losses = _setup(rank, args.batch, args.latent, args.base)
        fns = steps_for(params, losses) if args.amortized_only else _main_table(rank, params, losses, args.steps)
        if args.fair_every:  # mean step of N fair-every-N steps against N plain steps, timed alike
            fns = {"mpd": fns["mpd"], "plain": fns["plain"], **amortized_steps(params, losses, args.fair_every)}
            times = interleaved_medians(fns, max(3, args.steps // 2))
            amortized.append((rank, {name: times[name] / (int(name.split()[-1]) if " " in name else 1)
                                     for name in fns}))
    for rank, mean in amortized:
        if rank == amortized[0][0]:
            print("\n| rank | fair-every N | mean step (ms) | N plain steps, mean (ms) | / plain |\n|---|---|---|---|---|")
        print(f"| {rank} | 1 (mpd) | {mean['mpd'] * 1e3:.0f} | {mean['plain'] * 1e3:.0f} (one call) | "
              f"{mean['mpd'] / mean['plain']:.2f} |")
        for name, seconds in mean.items():
            if name.startswith("fair-every"):
                n = name.split()[-1]
                plain = mean[f"plain {n}"]
                print(f"| {rank} | {n} | {seconds * 1e3:.0f} | {plain * 1e3:.0f} | {seconds / plain:.2f} |")
    return 0
