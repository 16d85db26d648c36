"""``python -m trainers bench gpu``: the full-size figures, side by side in one run on one GPU
(under 8 minutes on a recent one), printed as a table with the device named.

- SDXL-shaped UNet built from the shipped ``core/configs/sdxl_unet.json`` with random weights
  (no download), LoRA rank 256 on the attention projections, 1024² (128² latents), batch 1,
  in bf16 and fp16 (``trainers.precision``: autocast forward, frozen weights in the compute
  dtype, LoRA fp32), each without and with gradient checkpointing. Steps as in ``bench
  fairhuman`` (the same step definitions): plain, floor (K backward passes), mpd (batched
  product), mpd-loop (K backward passes, ``--batched-vjp false``), reference (fresh params×3
  fp32 buffer + host least squares). Median time and ``torch.cuda.max_memory_allocated`` of each.
- SD1.5-shaped pipeline from the shipped configs at 512²: LAN sampling vs. plain sampling (time),
  and a Diffusion-DPO step vs. a plain LoRA step (peak memory).

Targets (issue 14), checked at the end: mpd ≤ 1.6× plain at rank 256 bf16; mpd's extra peak over
plain ≤ (K−1) × LoRA parameter bytes + 5%; reference ≥ 1.3× mpd.

``--smoke``: the same code on the tiny models at tiny sizes (runs on the CPU; a test runs it so
it cannot rot).
"""
from __future__ import annotations

import argparse
import time

import torch

from core.objectives import regional_losses

from .dpo import plain_and_dpo_steps
from .fairhuman import add_lora, step_inputs, steps_for
from .measure import interleaved_medians, peak_bytes

K = 3
STEPS = ("plain", "floor", "mpd", "mpd-loop", "reference")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes (CPU-sized; for the test)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"],
                        help="compute dtypes of the SDXL steps")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default 256; smoke 4)")
    parser.add_argument("--latent", type=int, default=None, help="SDXL latent side (default 128 = 1024 px; smoke 8)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per step (default 3; smoke 1)")
    parser.add_argument("--device", default="", help="device (default: cuda if available, else cpu)")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def full_size_unet(arch: str, device, dtype: torch.dtype):
    """The real-size UNet of ``arch`` (sdxl | sd15) from the shipped config, random weights,
    created on ``device`` (``meta`` for a free structural check)."""
    from diffusers import UNet2DConditionModel

    from core.checkpoints.convert import shipped_config

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(shipped_config(f"{arch}_unet"))
    return unet.to(dtype=dtype)


def full_size_sd15(device, dtype: torch.dtype):
    """An SD1.5-shaped pipeline from the shipped configs (UNet, VAE, CLIP-L), random weights; the
    tiny tokenizer (its ids are valid CLIP ids)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.checkpoints.convert import shipped_config
    from core.tiny_tokenizer import tiny_clip_tokenizer

    with torch.device(device):
        vae = AutoencoderKL.from_config(shipped_config("sd15_vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**shipped_config("clip_l_text_encoder")))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(),
        unet=full_size_unet("sd15", device, torch.float32),
        scheduler=DDIMScheduler.from_config(shipped_config("sd15_scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _sdxl_unet(smoke: bool, device, dtype):
    if smoke:
        from core.tiny_models import build_tiny_pipeline

        return build_tiny_pipeline("tiny-sdxl").unet.to(device=device, dtype=dtype)
    return full_size_unet("sdxl", device, dtype)


def sdxl_rows(unet, params, precision, latent: int, rounds: int, checkpointing: bool, warmup: int = 1) -> dict:
    """Median time and peak memory of every step in ``STEPS``, one configuration."""
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    inputs, noise, face, hand = step_inputs(unet, 1, latent, precision.device)

    def losses():
        with precision.autocast():
            pred = unet(**inputs).sample
        return regional_losses(pred, noise, face, hand)

    fns = {name: fn for name, fn in steps_for(params, losses, precision.device).items() if name in STEPS}
    times = interleaved_medians(fns, rounds, warmup=warmup, device=precision.device)
    peaks = {name: peak_bytes(fn, precision.device) for name, fn in fns.items()}
    for p in params:
        p.grad = None
    return {name: (times[name], peaks[name]) for name in fns}


def lan_and_dpo(smoke: bool, device, dtype, rounds: int) -> dict:
    """SD1.5 at 512² (smoke: tiny at 64²): LAN/plain sampling time and DPO/plain step peak."""
    from core.tiny_models import build_tiny_pipeline
    from trainers.model import TrainableModel
    from trainers.sample import lan_generate

    size, steps = (64, 4) if smoke else (512, 20)
    pipe = build_tiny_pipeline("tiny-sd15").to(device) if smoke else full_size_sd15(device, torch.float32)
    model = TrainableModel(pipe, rank=8, dtype=dtype, device=device)  # the training policy
    common = dict(num_inference_steps=steps, height=size, width=size, output_type="latent")

    def plain_sampling():
        with torch.no_grad(), model.precision.autocast():
            pipe("a photo of hands", generator=torch.Generator().manual_seed(0), **common)

    def lan_sampling():
        with torch.no_grad(), model.precision.autocast():
            lan_generate(pipe, "a photo of hands", seed=0, strength=1.0, **common)

    model.unet.eval()
    times = interleaved_medians({"plain": plain_sampling, "lan": lan_sampling}, rounds, warmup=1, device=device)
    model.unet.train()
    _, _, plain_step, dpo_step = plain_and_dpo_steps(model, 1, size // 8, device)
    peaks = {"plain": peak_bytes(plain_step, device), "dpo": peak_bytes(dpo_step, device)}
    return {"lan_time": times["lan"] / times["plain"], "dpo_peak": peaks["dpo"] / peaks["plain"],
            "size": size, "steps": steps}


def run(args: argparse.Namespace) -> int:
    from trainers.precision import Precision

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank = args.rank or (4 if args.smoke else 256)
    latent = args.latent or (8 if args.smoke else 128)
    rounds = args.rounds or (1 if args.smoke else 3)
    begin = time.perf_counter()
    print(f"device: {_device_name(device)}; torch {torch.__version__}; {'smoke (tiny models)' if args.smoke else 'full size'}")
    print(f"SDXL-shaped UNet, LoRA rank {rank} on to_q/to_k/to_v/to_out.0, {latent * 8}² ({latent}² latents), batch 1, "
          f"K = {K}; median of {rounds} interleaved rounds after {0 if args.smoke else 1} warm-up; "
          "peak = max allocated during the step\n")
    print("| dtype | checkpointing | step | time (ms) | / plain | peak MiB | extra vs plain MiB | (K-1) x LoRA MiB |")
    print("|---|---|---|---|---|---|---|---|")
    verdicts = []
    for name in args.dtypes:
        precision = Precision.from_name(name, device)
        precision.check()
        unet = _sdxl_unet(args.smoke, device, precision.dtype)
        params = add_lora(unet, rank)
        lora_bytes = sum(p.numel() * p.element_size() for p in params)
        budget = (K - 1) * lora_bytes
        for checkpointing in (False, True):
            try:
                rows = sdxl_rows(unet, params, precision, latent, rounds, checkpointing, warmup=0 if args.smoke else 1)
            except RuntimeError as err:  # one configuration failing (OOM, say) must not lose the others
                print(f"| {name} | {'on' if checkpointing else 'off'} | failed: {str(err).splitlines()[0][:120]} |")
                verdicts.append((f"{name}, checkpointing {'on' if checkpointing else 'off'} ran", 0.0, False))
                continue
            plain_t, plain_m = rows["plain"]
            for step, (t, m) in rows.items():
                print(f"| {name} | {'on' if checkpointing else 'off'} | {step} | {t * 1e3:.0f} | {t / plain_t:.2f} | "
                      f"{m / 2**20:.0f} | {(m - plain_m) / 2**20:.0f} | {budget / 2**20:.0f} |")
            mpd_t, mpd_m = rows["mpd"]
            label = f"{name}, checkpointing {'on' if checkpointing else 'off'}"
            if name == "bf16":
                verdicts.append((f"mpd / plain ≤ 1.6 ({label})", mpd_t / plain_t, mpd_t / plain_t <= 1.6))
            verdicts.append((f"mpd extra ≤ (K-1) x LoRA + 5% ({label}), as a fraction of the budget",
                             (mpd_m - plain_m) / budget, mpd_m - plain_m <= 1.05 * budget))
            verdicts.append((f"reference / mpd ≥ 1.3 ({label})", rows["reference"][0] / mpd_t,
                             rows["reference"][0] / mpd_t >= 1.3))
        del unet, params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sd15 = lan_and_dpo(args.smoke, device, Precision.from_name(args.dtypes[0], device).dtype, rounds)
    print(f"\nSD1.5-shaped, {sd15['size']}², {args.dtypes[0]}: LAN sampling / plain sampling time "
          f"{sd15['lan_time']:.2f} ({sd15['steps']} steps); DPO step / plain LoRA step peak memory {sd15['dpo_peak']:.3f}")
    print("\n| target | measured | met |\n|---|---|---|")
    for text, value, met in verdicts:
        print(f"| {text} | {value:.2f} | {'yes' if met else 'NO'} |")
    print(f"\ntotal {time.perf_counter() - begin:.0f} s")
    return 0
