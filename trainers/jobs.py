"""Run directories, the JSON-lines event log and crash-safe file writes.

A run directory holds ``config.json`` (the resolved configuration), ``events.jsonl`` (one JSON
object per line: start, progress, checkpoint, sample, done, error — the protocol the ComfyUI
node tails), ``checkpoints/step_<N>.pt`` and the final LoRA. Every file is written to a temporary
name in the same folder, flushed to disk and renamed over the target, so a crash or a full disk
never leaves a half-written LoRA or checkpoint behind: the old file (or none) stays.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from core.atomic import atomic_path


def write_json_atomic(path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


def _finite(value):
    """JSON has no NaN/inf: report them as strings a reader can still show."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class EventLog:
    """Appends one JSON object per line and flushes each, so a tailing reader sees it at once."""

    def __init__(self, path: str | os.PathLike, echo: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo

    def emit(self, event: str, **fields) -> dict:
        record = {"event": event, "time": round(time.time(), 3), **_finite(fields)}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        if self.echo:
            print(_human(record), flush=True)
        return record


def read_events(path) -> list[dict]:
    """All complete events of a log (a torn last line from a killed writer is ignored)."""
    events = []
    path = Path(path)
    if not path.exists():
        return events
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def _human(record: dict) -> str:
    kind = record["event"]
    if kind == "progress":
        losses = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.get("losses", {}).items())
        weights = record.get("weights")
        wtxt = f" w={[round(w, 3) for w in weights]}" if weights else ""
        return (f"[{record['step']}/{record['total']}] {losses}{wtxt} "
                f"{record.get('it_per_s', 0):.2f} it/s ETA {record.get('eta_s', 0):.0f}s")
    extra = {k: v for k, v in record.items() if k not in ("event", "time")}
    return f"[{kind}] " + json.dumps(extra)[:300]


# ---- checkpoints ----------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}.pt"


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
