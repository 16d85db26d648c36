"""``python -m trainers bench annotate``: annotation throughput on ~1024-px group photos.

The six face-api sample photos, downscaled to a long side of ``--side`` px and copied until
there are ``--images`` of them, are annotated from scratch by the real ``annotate`` command in
several configurations, one after the other in this run (the machine is noisy: compare the
ratios). Times include starting the worker processes and creating their detectors. The CPU
time per image of the one-worker run (in this process, user + system) does not depend on what
else the machine runs: two free cores annotate at most about 2000 / (CPU ms per image) images/s.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from core.fileio import read_jsonl

CONFIGS = {  # name -> extra annotate arguments
    "tiles, 2 workers": ["--workers", "2"],
    "tiles, 1 worker": ["--workers", "1"],
    "whole image only, 2 workers": ["--workers", "2", "--no-tiles"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=48, help="images per configuration (default 48)")
    parser.add_argument("--side", type=int, default=1024, help="long side of the photos in px (default 1024)")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS),
                        help="configurations to time (default: all)")


def _prepare(folder: Path, count: int, side: int) -> None:
    from PIL import Image

    from trainers.photos import sample_photos

    photos = sample_photos()
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as im:
            scale = side / max(im.size)
            im.convert("RGB").resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS).save(
                folder / f"photo{i:03d}.jpg", quality=92)


def _cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)  # pool workers are the forkserver's children, not ours
    return own.ru_utime + own.ru_stime


def _annotate(folder: Path, extra: list[str]) -> tuple[float, float, dict]:
    from trainers import annotate

    parser = argparse.ArgumentParser()
    annotate.add_arguments(parser)
    args = parser.parse_args([str(folder), *extra])
    start, cpu = time.perf_counter(), _cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):
        code = annotate.run(args)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    if code != 0:
        raise RuntimeError(f"annotate exited with {code}")
    rows = read_jsonl(folder / "metadata.jsonl")
    return elapsed, cpu, {"faces": sum(len(r["faces"]) for r in rows), "hands": sum(len(r["hands"]) for r in rows)}


def run(args: argparse.Namespace) -> int:
    import os

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "photos"
        source.mkdir()
        _prepare(source, args.images, args.side)
        print(f"{args.images} photos, long side {args.side} px, {os.cpu_count()} CPU cores", flush=True)
        results = []
        for name in args.configs:
            folder = Path(tmp) / name.replace(" ", "_").replace(",", "")
            folder.mkdir()
            for path in source.iterdir():
                os.link(path, folder / path.name)
            elapsed, cpu, found = _annotate(folder, CONFIGS[name])
            results.append((name, elapsed, cpu, found))
            print(f"  {name}: {args.images / elapsed:.2f} images/s", flush=True)
    base = results[0][1]
    print()
    print("| configuration | images/s | time ratio | faces found | hands found |")
    print("|---|---|---|---|---|")
    for name, elapsed, cpu, found in results:
        print(f"| {name} | {args.images / elapsed:.2f} | {elapsed / base:.2f} | {found['faces']} | {found['hands']} |")
    for name, elapsed, cpu, found in results:
        if CONFIGS[name][:2] == ["--workers", "1"]:
            print(f"\nCPU time per image ({name}, in this process, detectors included): {cpu / args.images * 1000:.0f} ms")
    return 0
