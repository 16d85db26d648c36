"""The run directory of a training job: its files and its checkpoints.

A run directory holds ``config.json`` (the resolved configuration), ``events.jsonl`` (one JSON
object per line: start, progress, checkpoint, sample, done, error — the protocol the ComfyUI
node tails), ``checkpoints/step_<N>.pt`` and the final LoRA. Every file is written to a temporary
name in the same folder, flushed to disk and renamed over the target, so a crash or a full disk
never leaves a half-written LoRA or checkpoint behind: the old file (or none) stays. The file
primitives and the event protocol are ``core.fileio``'s, shared with the ComfyUI nodes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from core.fileio import atomic_path


# ---- checkpoints ----------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def checkpoint_step(path: Path) -> int:
    """The step a ``checkpoint_path`` file was saved at (its name says it)."""
    return int(Path(path).stem.split("_")[-1])


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = sorted(folder.glob("step_*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Save a training state (tensors, numbers, strings, dicts, lists only) atomically and keep
    the newest ``keep`` checkpoints."""
    path = checkpoint_path(run_dir, step)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    old = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step_*.pt"))[:-keep]
    for stale in old:
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint holds plain tensors and containers; never unpickle code.
    return torch.load(path, map_location="cpu", weights_only=True)
