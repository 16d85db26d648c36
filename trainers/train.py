"""``python -m trainers train``: a LoRA training job (FairHuman or HG-DPO) in a run directory.

Exit codes: 0 done, 1 failed (the error event says why), 3 cancelled (SIGTERM/SIGINT; the last
checkpoint is kept and ``--resume`` continues from it).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import traceback
from pathlib import Path

from .config import TrainConfig, add_config_arguments, read_config_file, resolve
from core.fileio import EVENTS_FILE, EventLog, write_json_atomic
from .methods import method_module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def _method_name(args) -> str:
    if args.method:
        return args.method
    if args.config:
        return read_config_file(args.config).get("method", TrainConfig.method)
    return TrainConfig.method


def resolve_run_config(args) -> TrainConfig:
    run_dir = Path(args.output or TrainConfig.output)
    saved = run_dir / "config.json"
    if args.resume and saved.is_file():
        # A resumed run keeps its recipe; only the step budget may grow.
        values = json.loads(saved.read_text())
        if args.steps:
            values["steps"] = args.steps
        return TrainConfig(**values)
    module = method_module(_method_name(args))
    return resolve(args, method_defaults=module.METHOD.defaults)


class _StopFlag:
    def __init__(self):
        self.requested = False

    def install(self):
        def handler(signum, _frame):
            self.requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
        return self

    def __call__(self) -> bool:
        return self.requested


def _init_distributed() -> None:
    """Join the process group that a launcher (``accelerate launch``, ``torchrun``) described in
    the environment: NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_run_config(args)
    run_dir = Path(cfg.output)
    events = EventLog(run_dir / EVENTS_FILE)
    try:
        if not cfg.data:
            raise ValueError("--data is required: an annotated folder (fairhuman) or a pairs folder (hg-dpo)")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", cfg.to_dict())
        events.emit("start", method=cfg.method, base=cfg.base, steps=cfg.steps, run_dir=str(run_dir),
                    resume=bool(args.resume))
        _init_distributed()
        from .train_job import run_job

        result = run_job(cfg, run_dir, events, resume=args.resume, stop_requested=_StopFlag().install())
    except Exception as err:  # the job's contract: every failure ends in an error event
        events.emit("error", message=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
        return 1
    if result["status"] == "cancelled":
        events.emit("cancelled", step=result["steps"])
        return 3
    events.emit("done", lora=result["lora"], steps=result["steps"], nan_steps=result["nan_steps"])
    return 0
