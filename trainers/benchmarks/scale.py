"""``python -m trainers bench scale``: build-pairs throughput in 1 and 2 processes (torchrun, gloo,
CPU, tiny SD1.5), and the scaling a GPU user should expect, as a calculation.

Each configuration runs the real command twice, on P and on 2P prompts: the difference of the two
wall times is the cost of P prompts without the start-up (imports, loading the pipeline and the
detector), so pairs per minute and images per second are the steady rates. Every process gets an
equal share of the cores (``OMP_NUM_THREADS`` = cores / processes), as torchrun would on a
machine of its own. The processes never talk while they work (each takes every W-th prompt and
journals its own part file), so on GPUs the rate is the per-image cost times the number of GPUs,
less the start-up; the calculation is printed with the per-image cost it assumes.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAPER_N = 20  # HG-DPO: 20 images per prompt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=4, help="P: prompts of the shorter run (default 4; the "
                                                               "longer has 2P)")
    parser.add_argument("--images-per-prompt", type=int, default=2, help="N (default 2)")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps (default 4)")
    parser.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    parser.add_argument("--gpu-seconds-per-image", type=float, default=2.5,
                        help="one GPU's seconds per image for the expectation (default 2.5: an assumption for "
                             "SD1.5 at 704x1024, 50 DPM-Solver++ steps with guidance, i.e. 100 UNet evaluations "
                             "at ~25 ms on an A100; replace it with your GPU's rate from a one-process run)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU counts of the expectation")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_build(prompts: list[str], folder: Path, processes: int, args) -> float:
    """Wall seconds of one ``build-pairs`` run on ``prompts`` in ``processes`` processes."""
    folder.mkdir(parents=True)
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    command = ["-m", "trainers", "build-pairs", "--base", "tiny-sd15", "--prompts", str(folder / "prompts.txt"),
               "--images-per-prompt", str(args.images_per_prompt), "--batch", str(args.images_per_prompt),
               "--steps", str(args.steps), "--size", str(args.size), "--output", str(folder / "out")]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())] if processes > 1 else []
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[2]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *launcher, *command], cwd=root, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"build-pairs in {processes} process(es) failed:\n{result.stderr[-3000:]}")
    return elapsed


def expectation(seconds_per_image: float, gpus: list[int], n: int = PAPER_N) -> list[str]:
    """The GPU table: independent workers, so G GPUs make G times the pairs of one."""
    per_pair = n * seconds_per_image
    lines = [f"Expected on GPUs (a calculation, not a measurement): a pair costs N x (seconds per image) = "
             f"{n} x {seconds_per_image:g} s = {per_pair:g} s on one GPU; G GPUs work without talking, so "
             f"pairs per hour = G x 3600 / {per_pair:g}.", "",
             "| GPUs | pairs per hour | images per second | 10,000 prompts take |", "|---|---|---|---|"]
    for g in gpus:
        rate = g * 3600 / per_pair
        lines.append(f"| {g} | {rate:.0f} | {g / seconds_per_image:.2f} | {10000 / rate:.1f} h |")
    return lines


def rate_row(processes: int, short: float, long: float, p: int, n: int, base: float | None):
    """(table row, pairs per minute or None) of a configuration whose P-prompt run took ``short``
    and 2P-prompt run ``long`` seconds; ``base``: the first configuration's rate (the speedup's 1)."""
    marginal = long - short  # P prompts without the start-up
    with_startup = 60 * 2 * p / long
    if marginal < 0.1 * long:  # start-up and noise dwarf the work: no steady rate to report
        return (f"| {processes} | {short:.1f} s | {long:.1f} s | too small to measure (raise --prompts or --steps) "
                f"| | | {with_startup:.1f} |"), None
    rate = 60 * p / marginal
    speedup = rate / (base or rate)
    return (f"| {processes} | {short:.1f} s | {long:.1f} s | {rate:.1f} | {p * n / marginal:.2f} | {speedup:.2f} | "
            f"{with_startup:.1f} |"), rate


def run(args: argparse.Namespace) -> int:
    p, n = args.prompts, args.images_per_prompt
    prompts = [f"a photo of person {k} waving" for k in range(2 * p)]
    print(f"build-pairs, tiny SD1.5, {args.size} px, {args.steps} steps, N = {n}, on {os.cpu_count()} CPU cores "
          f"(gloo); each configuration on {p} and {2 * p} prompts", flush=True)
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            short = timed_build(prompts[:p], Path(tmp) / f"{processes}-short", processes, args)
            long = timed_build(prompts, Path(tmp) / f"{processes}-long", processes, args)
            row, rate = rate_row(processes, short, long, p, n, base)
            base = base or rate
            rows.append(row)
            print(row, flush=True)
    print()
    print("| processes | wall, P prompts | wall, 2P prompts | pairs per minute | images per second | speedup | "
          "pairs per minute with start-up (2P) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("\n".join(expectation(args.gpu_seconds_per_image, args.gpus)))
    return 0
