"""``python -m trainers train``: a LoRA training job (FairHuman or HG-DPO) in a run directory.

Exit codes: 0 done, 1 failed (the error event says why), 2 refused before starting (one line
``error: ...`` on stderr; nothing written, an earlier run untouched), 3 cancelled (SIGTERM/SIGINT;
the last checkpoint is kept and ``--resume`` continues from it).

An existing run in ``--output`` is never silently replaced: without ``--resume`` it is refused
unless ``--overwrite``; ``--resume`` keeps the saved recipe and refuses flags that would change
it (the step budget and logging may change); ``--resume`` where there is nothing to resume starts
a new run and says so in a ``warning`` event — so a caller (the ComfyUI node) can always pass it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from core.fileio import (CANCELLED, DONE, ERROR, EVENTS_FILE, PROGRESS, START, WARNING, EventLog, read_events,
                         write_json_atomic)
from core.job_spec import MAY_CHANGE_ON_RESUME, settings_differences

from .config import (ConfigError, TrainConfig, add_config_arguments, current_names, explicit_values, resolve,
                     validate)
from .methods import METHODS, method_module
from .run_dir import checkpoint_step, latest_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


RUN_FILES = ("config.json", EVENTS_FILE)  # a run directory's own files; with these folders:
RUN_FOLDERS = ("checkpoints", "samples", "plots", "cache")


@dataclass
class RunPlan:
    cfg: TrainConfig
    resume: bool
    warnings: list = field(default_factory=list)


def _earlier_run(run_dir: Path) -> str | None:
    """A short description of the run a folder holds, or None when it holds none."""
    if not ((run_dir / "config.json").is_file() or latest_checkpoint(run_dir) is not None):
        return None
    try:
        progress = [e for e in read_events(run_dir / EVENTS_FILE) if e.get("event") == PROGRESS]
    except ValueError:
        progress = []
    step = f"step {progress[-1]['step']} of {progress[-1]['total']}" if progress else "no step logged"
    loras = sorted(p.name for p in run_dir.glob("*.safetensors"))
    return step + (f", LoRA {loras[0]}" if loras else "")


def _saved_config(path: Path) -> TrainConfig:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is unreadable ({err}); use --overwrite to start the run over") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in current_names(values).items() if k in known})


def plan_run(args) -> RunPlan:
    """Decide what ``train`` will do, refusing (ConfigError) anything that would lose or mix up
    an earlier run — before anything is written or loaded."""
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run, or replace it")
    given = explicit_values(args)
    run_dir = Path(given.get("output") or TrainConfig.output)
    earlier = _earlier_run(run_dir)
    warnings = []
    if earlier and not (args.resume or args.overwrite):
        raise ConfigError(f"{run_dir} holds an earlier run ({earlier}); add --resume to continue it, "
                          "or --overwrite to replace it")
    saved = run_dir / "config.json"
    if args.resume and saved.is_file():
        cfg = _saved_config(saved)
        differ = settings_differences({k: getattr(cfg, k) for k in given}, given)
        if differ:
            raise ConfigError(f"--resume: these settings differ from {saved}: {'; '.join(differ)}; drop them to "
                              "resume, or use --overwrite (or another --output) to train with them")
        cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if k in MAY_CHANGE_ON_RESUME})
        checkpoint = latest_checkpoint(run_dir)
        done = checkpoint_step(checkpoint) if checkpoint else 0
        if cfg.steps < done:
            raise ConfigError(f"--steps {cfg.steps} is below the run's last checkpoint (step {done}); "
                              "give at least that many")
        if checkpoint is None:
            warnings.append(f"{run_dir} has no checkpoint yet: the run starts again from step 0")
        plan = RunPlan(cfg, resume=True, warnings=warnings)
    else:
        if args.resume:
            warnings.append(f"nothing to resume in {run_dir}: starting a new run")
        name = given.get("method", TrainConfig.method)  # an unknown one is named by validate()
        defaults = method_module(name).METHOD.defaults if name in METHODS else {}
        plan = RunPlan(resolve(args, method_defaults=defaults), resume=False, warnings=warnings)
    validate(plan.cfg)
    try:
        method_module(plan.cfg.method).METHOD.check_data(plan.cfg)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    return plan


def clear_run(run_dir: Path) -> None:
    """--overwrite: remove the earlier run's files (and only those) from its folder."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for lora in run_dir.glob("*.safetensors"):
        lora.unlink()


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


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run(args: argparse.Namespace) -> int:
    # The process group first: under a launcher every process plans on the folder as it was, and
    # only the main one writes (else a second process finds the first one's config.json and
    # refuses it as "an earlier run").
    _init_distributed()
    try:
        plan = plan_run(args)
    except ConfigError as err:  # refused: nothing was written, an earlier run is untouched
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .train_job import is_main_process, run_job

    cfg, main = plan.cfg, is_main_process()
    run_dir = Path(cfg.output)
    _barrier()  # every process has planned
    events = EventLog(run_dir / EVENTS_FILE)
    try:
        if main:
            if args.overwrite:
                clear_run(run_dir)
            write_json_atomic(run_dir / "config.json", cfg.to_dict())
            events.emit(START, method=cfg.method, base=cfg.base, steps=cfg.steps, run_dir=str(run_dir),
                        resume=plan.resume)
            for message in plan.warnings:
                events.emit(WARNING, message=message)
        _barrier()  # the folder is ready before any process writes into it
        result = run_job(cfg, run_dir, events, resume=plan.resume, stop_requested=_StopFlag().install())
    except Exception as err:  # the job's contract: every failure ends in an error event
        events.emit(ERROR, message=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
        return 1
    if result["status"] == "cancelled":
        events.emit(CANCELLED, step=result["steps"])
        return 3
    events.emit(DONE, lora=result["lora"], steps=result["steps"], nan_steps=result["nan_steps"])
    return 0
