"""``python -m trainers sample``: images from a base model, optionally with a LoRA and LAN.

LAN here has the semantics of the ComfyUI node: the reference trajectory (the base model, LoRA
switched off) is sampled first from the same noise and its per-channel latent statistics are
recorded after every step; then the LoRA trajectory is sampled and its latent's statistics are
set to the recorded ones after every step (``callback_on_step_end``). One denoiser in memory. The
statistics are the latent grid's channels' (on Flux the pipeline's packed tokens are unpacked for
them: ``ModelFamily.pipeline_latents_to_grid``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from core.fileio import atomic_path, write_json_atomic
from core.lan import StatsRecorder

from . import base_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="tiny-sdxl",
                        help="a tiny base (tiny-sd15, tiny-sdxl, tiny-flux, tiny-zimage, tiny-sd3), an SD1.5/SDXL "
                             "single-file checkpoint, a Flux.1/SD3.5/Z-Image diffusion model file (with "
                             "--text-encoders, --vae) or a diffusers folder")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--lora", type=Path, help="a LoRA file (kohya, diffusers or PEFT layout)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (HG-DPO: 0.5; FairHuman: 0.3-0.5)")
    parser.add_argument("--lan", action="store_true", help="Latent Adaptive Normalization against the base model")
    parser.add_argument("--lan-strength", type=float, default=1.0, help="LAN strength in [0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt's noise (+1 per prompt)")
    parser.add_argument("--steps", type=int, default=30, help="sampler steps")
    parser.add_argument("--cfg", type=float, default=7.0,
                        help="classifier-free guidance scale (Flux.1-dev: used only with --negative; its "
                             "distilled guidance is 3.5, as trained; Z-Image-Turbo: 1, none)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for single-file checkpoints")
    base_files.add_arguments(parser)
    parser.add_argument("--output", type=Path, default=Path("outputs/samples"), help="folder for the PNGs")


def lan_generate(pipe, prompt: str, *, seed: int, strength: float, **kwargs):
    """One image with LAN: the reference pass (adapters off) then the tuned pass (adapters on).
    Returns (image, recorder, tuned per-step stats) — the last two for checks and benchmarks."""
    from core.families import family_of
    from core.lan import channel_stats

    family = family_of(pipe)
    height, width = kwargs.get("height"), kwargs.get("width")

    def grid(latents):
        return family.pipeline_latents_to_grid(latents, height, width)

    recorder = StatsRecorder()

    def record(_pipe, _step, _t, tensors):
        recorder.record(grid(tensors["latents"]))
        return tensors

    tuned_stats = []

    def match(_pipe, step, _t, tensors):
        latents = recorder.normalize(grid(tensors["latents"]), step, strength)
        tuned_stats.append(channel_stats(latents))
        return {"latents": family.grid_to_pipeline_latents(latents)}

    pipe.disable_lora()
    try:
        pipe(prompt, generator=torch.Generator().manual_seed(seed), callback_on_step_end=record,
             **{**kwargs, "output_type": "latent"})
    finally:
        pipe.enable_lora()
    image = pipe(prompt, generator=torch.Generator().manual_seed(seed), callback_on_step_end=match,
                 **kwargs).images[0]
    return image, recorder, tuned_stats


def run(args: argparse.Namespace) -> int:
    if args.lan and args.lora is None:
        raise SystemExit("--lan needs --lora: LAN matches the LoRA model to the model without it")
    if not 0.0 <= args.lan_strength <= 1.0:
        raise SystemExit("--lan-strength must be in [0, 1]")
    if args.lora is not None and not args.lora.is_file():
        raise SystemExit(f"LoRA file not found: {args.lora}")
    from core.families import family_of

    pipe = base_files.load_pipeline_of(args)
    family = family_of(pipe)
    try:
        family.require_rendering()  # before the LoRA loads, and for --lan, which calls the pipeline itself
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.lora is not None:
        from core.lora_format import load_into_pipeline, lora_architecture, lora_fits

        base_arch = family.name
        try:
            lora_arch = lora_architecture(args.lora)
        except ValueError as err:  # not a safetensors file
            raise SystemExit(str(err)) from None
        if not lora_fits(lora_arch, base_arch):
            raise SystemExit(f"{args.lora.name} is a LoRA for {lora_arch}, the base {args.base} is {base_arch}: "
                             f"use a {lora_arch} base or a LoRA trained on {base_arch}")
        try:
            load_into_pipeline(family, args.lora, "lora")
        except (RuntimeError, ValueError, KeyError) as err:  # shapes that fit no module of this base
            first = str(err).strip().splitlines()[0][:200]
            raise SystemExit(f"{args.lora.name} does not fit the {base_arch} base {args.base} ({first})") from None
        pipe.set_adapters(["lora"], adapter_weights=[args.lora_scale])
    args.output.mkdir(parents=True, exist_ok=True)
    common = dict(num_inference_steps=args.steps, **family.guidance_kwargs(args.cfg, args.negative))
    if args.size:
        common.update(height=args.size, width=args.size)
    written = []
    for k, prompt in enumerate(args.prompt):
        seed = args.seed + k
        if args.lan:
            image, _, _ = lan_generate(pipe, prompt, seed=seed, strength=args.lan_strength, **common)
        else:
            image = family.render(prompt, torch.Generator().manual_seed(seed), **common)[0]
        path = args.output / f"{k:03d}_seed{seed}{'_lan' if args.lan else ''}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        written.append(str(path))
        print(f"wrote {path}")
    write_json_atomic(args.output / "samples.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                                     "images": written})
    return 0
