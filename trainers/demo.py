"""``python -m trainers demo``: the end-to-end demo on the embedded tiny SDXL-shaped model."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="report folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model weights and noise")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")


def run(args: argparse.Namespace) -> int:
    import torch

    from core.models import build_tiny_pipeline

    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = build_tiny_pipeline("tiny-sdxl", seed=args.seed)
    image = pipe(
        "a photo of two people waving hands",
        num_inference_steps=8,
        height=args.size,
        width=args.size,
        generator=torch.Generator().manual_seed(args.seed),
    ).images[0]
    path = args.output / "tiny_sdxl_sample.png"
    image.save(path)
    print(f"wrote {path} ({time.perf_counter() - start:.1f} s)")
    return 0
