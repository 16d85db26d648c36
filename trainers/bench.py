"""``python -m trainers bench NAME``: benchmarks that print ratio tables measured side by side.

Each benchmark is a module ``trainers/benchmarks/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; only the chosen one is imported.
"""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "fairhuman": "plain LoRA step vs. MPD step vs. reference-style step (time and memory)",
    "controlnet": "plain ControlNet step vs. MPD step on the tiny SDXL-shaped ControlNet (time and memory)",
    "fairness": "weightings on a regime that can tell them apart: own best lr, and matched update norm under SGD",
    "dpo": "peak memory of a Diffusion-DPO step vs. a plain LoRA step",
    "lan": "LAN sampling vs. plain sampling (time and peak memory)",
    "annotate": "annotation throughput (images/s) on ~1024 px photos",
    "scale": "build-pairs in 1 and 2 processes (torchrun, gloo): pairs per minute, images/s; the GPU expectation",
    "memory": "GPU memory of a rank-32 MPD LoRA at 1024² per diffusion-transformer family, calculated from the full-size shapes",
    "gpu": "full-size SDXL (rank 256, 1024², bf16/fp16) plain/MPD/reference steps, SD1.5 LAN and DPO ratios, on one GPU",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark: " + "; ".join(
        f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"{__package__}.benchmarks.{args.name}")
    parser = argparse.ArgumentParser(prog=f"python -m trainers bench {args.name}", description=BENCHMARKS[args.name])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.rest)) or 0)
