"""``python -m trainers demo``: annotate real photos, train a FairHuman LoRA on the embedded
tiny SDXL-shaped model, sample the same prompts and seeds with and without it, write a report.

The model is tiny and random, so the images are noise-like: the demo shows the whole job
working end to end (masks, three objectives, MPD weights, resumable run, LoRA export, sampling),
in a few minutes on a CPU, not a quality gain.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from core.fileio import write_json_atomic

PROMPTS = ("a photo of people waving hands", "a portrait of a smiling woman", "two friends holding hands")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="report folder")
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    parser.add_argument("--resolution", type=int, default=128, help="training side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data order and noise")


def _stage(message: str) -> float:
    print(f"== {message}", flush=True)
    return time.perf_counter()


def prepare_photos(data_dir: Path) -> list[Path]:
    """Copy the demo photos into ``data_dir`` with kohya-style caption files."""
    from trainers.photos import sample_photos

    data_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for i, src in enumerate(sample_photos()):
        dst = data_dir / src.name
        if not dst.exists():
            shutil.copyfile(src, dst)
        dst.with_suffix(".txt").write_text(PROMPTS[i % len(PROMPTS)], encoding="utf-8")
        copied.append(dst)
    return copied


def sample_grid(base: str, lora: Path, prompts, seed: int, size: int, out: Path) -> Path:
    """Rows: prompts; columns: base model, base + LoRA, with the same seed per row."""
    import numpy as np
    import torch
    from PIL import Image

    from core.families import family_of
    from core.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline(base, seed=seed)
    family = family_of(pipe)

    def render():
        return [np.asarray(family.render(prompt, torch.Generator().manual_seed(seed + k), num_inference_steps=12,
                                         height=size, width=size)[0])
                for k, prompt in enumerate(prompts)]

    without = render()
    pipe.load_lora_weights(str(lora))
    with_lora = render()
    rows = [np.concatenate(pair, axis=1) for pair in zip(without, with_lora)]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(out)  # tiny images: enlarge
    return out


def run(args: argparse.Namespace) -> int:
    from trainers import annotate as annotate_cmd
    from trainers import train as train_cmd
    from trainers.report import plot_run

    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    t = _stage("1/4 photos and annotation (mediapipe faces and hands)")
    data = out / "data"
    prepare_photos(data)
    parser = argparse.ArgumentParser()
    annotate_cmd.add_arguments(parser)
    if annotate_cmd.run(parser.parse_args([str(data)])) != 0:
        print("annotation failed; see the messages above")
        return 1
    print(f"   {time.perf_counter() - t:.1f} s")

    t = _stage(f"2/4 FairHuman LoRA on tiny-sdxl, {args.steps} steps, MPD weighting")
    run_dir = out / "run"
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    train_args = parser.parse_args([
        "--method", "fairhuman", "--base", "tiny-sdxl", "--data", str(data), "--output", str(run_dir),
        "--steps", str(args.steps), "--resolution", str(args.resolution), "--rank", "8", "--lr", "5e-3", "--batch-size", "2",
        "--checkpoint-every", "10", "--log-every", "1", "--seed", str(args.seed), "--resume",
    ])
    if train_cmd.run(train_args) != 0:
        print(f"training failed; see {run_dir / 'events.jsonl'}")
        return 1
    print(f"   {time.perf_counter() - t:.1f} s")

    t = _stage("3/4 plots of losses and MPD weights")
    plots = plot_run(run_dir / "events.jsonl", out)
    print(f"   {time.perf_counter() - t:.1f} s")

    t = _stage("4/4 the same prompts and seeds without / with the LoRA")
    lora = next(run_dir.glob("*.safetensors"))
    grid = sample_grid("tiny-sdxl", lora, PROMPTS, args.seed, 64, out / "samples_base_vs_lora.png")
    print(f"   {time.perf_counter() - t:.1f} s")

    summary = {
        "lora": str(lora), "events": str(run_dir / "events.jsonl"), "plots": [str(p) for p in plots],
        "samples": str(grid), "annotations": str(data / "metadata.jsonl"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json_atomic(out / "report.json", summary)
    print(f"report in {out}: {', '.join(Path(p).name for p in [*plots, grid])} ({summary['seconds']} s)")
    return 0
