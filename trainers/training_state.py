"""What a training checkpoint holds, written and read in one place.

A checkpoint is everything a resumed run needs to continue bit for bit (the noise, timesteps and
data order are functions of (seed, step), so they need no state): the trained tensors, the
optimizer, the LR schedule, the GradScaler, the step gradients' own state (the weighting's state
and the fair schedule's last solved weights, ``core.combine.FairCombiner.state_dict``) and two
counters. ``state_dict`` writes exactly the keys ``load_state_dict`` reads.

Older checkpoints still resume: the trained tensors under ``"lora"`` (before ControlNet runs
shared the format) and no ``"last_weights"`` (before ``--fair-every``; the next step solves).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .run_dir import latest_checkpoint, load_checkpoint, save_checkpoint

LEGACY_KEYS = {"lora": "trainable"}  # an old checkpoint's name -> today's


def upgraded(state: dict) -> dict:
    """A checkpoint's dict under today's key names."""
    return {LEGACY_KEYS.get(key, key): value for key, value in state.items()}


def trainable_state(state: dict) -> dict:
    """The trained tensors of a checkpoint's dict (of any version)."""
    return upgraded(state)["trainable"]


@dataclass
class TrainingState:
    trainable: object  # trainers.trainables.Trainable
    optimizer: object
    lr_scheduler: object
    gradients: object  # trainers.loop.StepGradients
    scaler: object  # torch.amp.GradScaler (a disabled one outside fp16)
    step: int = 0  # optimizer steps done
    nan_steps: int = 0  # skipped steps, in total

    def state_dict(self) -> dict:
        return {
            "step": self.step, "trainable": self.trainable.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "nan_steps": self.nan_steps, **self.gradients.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        state = upgraded(state)
        self.trainable.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.gradients.load_state_dict(state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.nan_steps = int(state["step"]), int(state.get("nan_steps", 0))

    def save(self, run_dir: Path, keep: int) -> Path:
        return save_checkpoint(run_dir, self.step, self.state_dict(), keep=keep)

    def restore(self, run_dir: Path) -> Path | None:
        """Load the run's latest checkpoint; its path, or None (then nothing changes)."""
        path = latest_checkpoint(run_dir)
        if path is not None:
            self.load_state_dict(load_checkpoint(path))
        return path
