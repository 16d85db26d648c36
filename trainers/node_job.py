"""``python -m trainers job SPEC.json``: one job of the ComfyUI training nodes, all its stages in
one process: annotate (a FairHuman dataset without ``metadata.jsonl``; with ``--pose`` for the
ControlNet when its records lack condition images), build-pairs (HG-DPO from prompts), train,
then the trained file is checked, plotted and copied where ComfyUI lists it. The spec's
``output_file`` / ``output_dest`` / ``output_listed`` name that file whatever it is: a LoRA, or for
``fairhuman-controlnet`` a ControlNet (into ``models/controlnet``).

The spec (``core.job_spec.JobSpec``) is written by the node side; a spec of another version is
refused (exit 2) before anything runs. Everything the job says goes
into ``<job dir>/events.jsonl`` through ``core.fileio``: a ``stage`` event before each stage,
``progress`` events (annotate and build-pairs count finished items; the trainer's own events
are forwarded with ``stage: "train"``), and exactly one final ``done``, ``error`` or
``cancelled`` event. The trainer keeps its own run directory (``<job dir>/train``) so
``report`` and ``--resume`` work on it as on any run.

With validation on, the trainer's best LoRA (``<name>_best.safetensors``) is copied beside the final
one, under the same rule (never over an existing file unless the spec allows it); the ``done``
event names both (``best_lora_name`` is the final LoRA's name when there is no best one).

Under a launcher (``torch.distributed.run``, one process per device: the job manager's
``devices``) every process runs this same command: each stage splits its items over the processes
(``trainers.shards``: per-rank part files that rank 0 merges), the trainer runs data-parallel,
and rank 0 alone speaks for the job (its ``events.jsonl``, progress counting every process's part
file, the copy and the final event); another rank's events go to ``events.rank<r>.jsonl``.

Exit codes: 0 done, 1 failed, 2 refused input, 3 cancelled (SIGTERM/SIGINT; resumable: running
the same spec again continues every stage where it stopped).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from core.fileio import (CANCELLED, DONE, ERROR, EVENTS_FILE, FINAL_EVENTS, PROGRESS, STAGE, START, WARNING,
                         EventLog, EventTail, atomic_path, read_jsonl, write_text_atomic)
from core.job_spec import JobSpec, SpecError
from core.masks.images import IMAGE_SUFFIXES

from .cli import main as cli_main
from .shards import Share, ShardedRecords
from .validation import best_name

TRAIN_DIR = "train"
ANNOTATIONS_DIR = "dataset"
PAIRS_DIR = "pairs"
PLOT_FILE = "loss_plot.png"
CONTROLNET_METHOD = "fairhuman-controlnet"
PHOTO_METHODS = ("fairhuman", CONTROLNET_METHOD)  # trained on a folder of photos (annotated first)


class Cancelled(BaseException):
    """SIGTERM/SIGINT outside the trainer (which handles them itself: checkpoint, exit 3).
    A BaseException so that no stage's ``except Exception`` records it as a failure."""


class StageFailed(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="job spec (JSON) written by the ComfyUI training nodes")


# ---- running one CLI command as a stage --------------------------------------------------------
class _ErrorLines(io.TextIOBase):
    """stderr that still reaches the log but remembers the ``error: ...`` lines a command prints
    when it refuses its input (exit 2)."""

    def __init__(self, target):
        self.target, self.refusals, self._partial = target, [], ""

    def write(self, text: str) -> int:
        self.target.write(text)
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        self.refusals += [line for line in lines if line.startswith("error:") or "error: " in line[:80]]
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def run_command(argv: list[str]) -> tuple[int, str | None]:
    """(exit code, the last error line it printed) of ``python -m trainers ARGV`` run here."""
    tee = _ErrorLines(sys.stderr)
    with contextlib.redirect_stderr(tee):
        try:
            code = cli_main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse and the commands' refusals
            code = exit_.code if isinstance(exit_.code, int) else 2
            if isinstance(exit_.code, str):
                tee.refusals.append(exit_.code)
    return int(code or 0), (tee.refusals[-1].split("error:", 1)[-1].strip() if tee.refusals else None)


class _Watcher(threading.Thread):
    """Polls a stage's output while it runs and emits what it finds (progress, forwarded events)."""

    def __init__(self, poll, interval: float = 0.3):
        super().__init__(daemon=True)
        self.poll, self.interval, self.stop = poll, interval, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.poll()

    def finish(self) -> None:
        self.stop.set()
        self.join()
        self.poll()


def _count_progress(events: EventLog, stage: str, journal: Path, total: int, key: str):
    """A poll emitting ``progress`` (stage, step = distinct finished items, total) when the
    stage's journal (metadata.jsonl, pairs.jsonl: one appended record per item) or one of its
    part files (``trainers.shards``: one per process under a launcher) grows."""
    seen = {"step": -1}
    files = ShardedRecords(journal, Share())

    def poll():
        try:
            done = len({r.get(key) for path in [journal, *files.parts()] for r in read_jsonl(path)})
        except Exception:  # being rewritten or merged at this moment: count again next time
            return
        done = min(done, total)
        if done != seen["step"]:
            seen["step"] = done
            events.emit(PROGRESS, stage=stage, step=done, total=total)

    return poll


def _run_counted(argv: list[str], count) -> tuple[int, str | None]:
    """``run_command`` with ``count`` (a ``_count_progress`` poll) watching it, on rank 0 only."""
    if not Share.of().reporter:
        return run_command(argv)
    watcher = _Watcher(count)
    watcher.start()
    try:
        return run_command(argv)
    finally:
        watcher.finish()


# ---- stages ----------------------------------------------------------------------------------
def _annotated(dataset: Path, pose: bool) -> bool:
    """Whether the dataset can be trained on as it is: it has metadata.jsonl and, for a ControlNet,
    every record names a condition image that exists."""
    from .annotate import METADATA
    from .data import read_records

    if not (dataset / METADATA).is_file():
        return False
    if not pose:
        return True
    try:
        return all(r.condition is not None and r.condition.is_file() for r in read_records(dataset))
    except Exception:  # unreadable records: annotate into the job folder instead
        return False


def annotate_stage(spec: JobSpec, job_dir: Path, events: EventLog, pose: bool = False) -> Path:
    """The folder to train on: the dataset itself when it is annotated (``_annotated``), else its
    annotation in the job folder (the user's folder is never written to; the user's own masks and
    condition images in its masks/ are used)."""
    from .annotate import METADATA, list_files

    dataset = Path(spec.dataset)
    if _annotated(dataset, pose):
        return dataset
    out = job_dir / ANNOTATIONS_DIR
    images, _ = list_files(dataset, out)
    if not images:
        raise StageFailed(f"dataset folder {dataset} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})", 2)
    events.emit(STAGE, name="annotate", images=len(images), pose=pose)
    code, message = _run_counted(["annotate", dataset, "--out", out, *(["--pose"] if pose else []),
                                  "--workers", max(1, min(4, os.cpu_count() or 1))],
                                 _count_progress(events, "annotate", out / METADATA, len(images), "image"))
    if code != 0:
        raise StageFailed(f"annotation failed: {message or f'exit code {code}'}", code)
    if not Share.of().reporter:
        return out  # rank 0 merges the records and judges them
    records = read_jsonl(out / METADATA)
    by_status = {}
    for record in records:
        by_status.setdefault(record.get("status"), []).append(record["image"])
    if by_status.get("no_people"):
        names = [Path(p).name for p in by_status["no_people"]]
        events.emit(WARNING, stage="annotate", message=(
            f"{len(names)} of {len(records)} images show no face or hand (trained on the whole-image loss "
            f"only): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"))
    if by_status.get("error"):
        names = [Path(p).name for p in by_status["error"]]
        events.emit(WARNING, stage="annotate", message=f"{len(names)} images could not be read and are left "
                                                       f"out: {', '.join(names[:8])}")
    if not by_status.get("ok") and not by_status.get("no_people"):
        raise StageFailed(f"no usable image in {dataset}: every image failed to load", 2)
    return out


def pairs_stage(spec: JobSpec, job_dir: Path, events: EventLog) -> Path:
    """The pairs folder to train on: the given one, or one built from the prompts (resumable)."""
    if spec.pairs:
        return Path(spec.pairs)
    from .methods.hg_dpo import PAIRS

    prompts = [p.strip() for p in spec.prompts if p.strip()]
    out = job_dir / PAIRS_DIR
    prompts_file = job_dir / "prompts.txt"
    write_text_atomic(prompts_file, "\n".join(prompts) + "\n")
    argv = spec.build_pairs_argv(prompts_file, out)
    events.emit(STAGE, name="build-pairs", prompts=len(prompts))
    code, message = _run_counted(argv, _count_progress(events, "build-pairs", out / PAIRS, len(set(prompts)),
                                                       "prompt"))
    if code != 0:
        raise StageFailed(f"build-pairs failed: {message or f'exit code {code}'} (queue the job again to "
                          f"retry the failed prompts)", code)
    return out


class _Forwarder:
    """Copies the trainer's events into the job's stream as they are appended (``stage: train``),
    keeping its final event for the job's own."""

    def __init__(self, source: Path, events: EventLog):
        # the trainer prints its own events to the log already: forward them silently
        self.tail, self.events, self.final = EventTail(source), EventLog(events.path, echo=False), None
        self.last_step = 0
        self.tail.read()  # a resumed run's earlier events are already in the job's stream

    def poll(self) -> None:
        for record in self.tail.read():
            kind = record.pop("event")
            record.pop("time", None)
            if "step" in record and isinstance(record["step"], int):
                self.last_step = record["step"]
            if kind in FINAL_EVENTS:
                self.final = (kind, record)
            else:
                self.events.emit(kind, stage="train", **record)


def train_stage(spec: JobSpec, job_dir: Path, events: EventLog, data: Path, resume: bool) -> dict:
    """``resume``: whether the run directory existed when the job started (decided then, before
    any process of a group could create it)."""
    run_dir = job_dir / TRAIN_DIR
    argv = spec.train_argv(data, run_dir)
    if resume:
        argv.append("--resume")  # the same output_name again: continue (a new run if nothing to resume)
    events.emit(STAGE, name="train", resume=resume)
    forwarder = _Forwarder(run_dir / EVENTS_FILE, events)
    # the trainer's events are written by rank 0: another rank forwards nothing
    watcher = _Watcher(forwarder.poll if Share.of().reporter else (lambda: None), interval=0.2)
    watcher.start()
    try:
        code, message = run_command(argv)
    finally:
        signal.signal(signal.SIGTERM, _raise_cancelled)  # the trainer installed its own handlers
        signal.signal(signal.SIGINT, _raise_cancelled)
        watcher.finish()
    if code == 3:
        raise Cancelled(forwarder.last_step)
    if code != 0:
        final = forwarder.final[1].get("message") if forwarder.final else None
        raise StageFailed(final or message or f"the trainer exited with code {code}; see {job_dir / 'job.log'}",
                          code)
    return {"file": run_dir / spec.output_file, "steps": forwarder.last_step, "run_dir": run_dir}


def finish_weights(spec: JobSpec, trained: dict) -> dict:
    """Check the trained file (LoRA or ControlNet) reads as safetensors with tensors, then copy it,
    and the validation's best LoRA when there is one, atomically to where ComfyUI lists them (never
    over an existing file unless the spec allows it; with ``overwrite``, a best LoRA of an earlier
    run that this one did not produce is removed). Returns the done event's file fields."""
    source = Path(trained["file"])
    _check_weights(source)
    dest = Path(spec.output_dest)
    best_source = source.with_name(best_name(source.name))  # the trainer's validation.best_name
    best_dest = dest.with_name(best_name(dest.name))
    copies = [(source, dest)] + ([(best_source, best_dest)] if best_source.is_file() else [])
    for _, target in copies:
        if target.exists() and not spec.overwrite:
            raise StageFailed(f"{target} already exists: choose another output_name or set overwrite to true", 2)
    if len(copies) > 1:
        _check_weights(best_source)
    for origin, target in copies:
        with atomic_path(target) as tmp:
            with open(origin, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
    if len(copies) == 1 and spec.overwrite:
        best_dest.unlink(missing_ok=True)  # an earlier run's best, not this LoRA's
    best = len(copies) > 1
    return {"lora": str(dest), "best_lora": str(best_dest) if best else None,
            "best_lora_name": best_name(spec.output_listed) if best else spec.output_listed}


def _check_weights(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            if not list(handle.keys()):
                raise ValueError("it holds no tensors")
    except Exception as err:
        raise StageFailed(f"the trained file {path} does not read: {err}") from None


def plot_job(job_dir: Path) -> Path | None:
    """One PNG with the run's plots stacked (losses, MPD weight shares or DPO margins)."""
    from PIL import Image

    from .report import plot_run

    written = plot_run(job_dir / TRAIN_DIR / EVENTS_FILE, job_dir / "plots")
    images = [Image.open(p).convert("RGB") for p in written]
    width = max(im.width for im in images)
    sheet = Image.new("RGB", (width, sum(im.height for im in images)), "white")
    y = 0
    for im in images:
        sheet.paste(im, ((width - im.width) // 2, y))
        y += im.height
    path = job_dir / PLOT_FILE
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


# ---- the job ---------------------------------------------------------------------------------
def _raise_cancelled(signum, _frame):
    raise Cancelled(None)


def join_group(share: Share) -> None:
    """Under a launcher: one process group for the whole job, which every stage's barriers and the
    trainer's collectives use. A group destroyed and created again on the launcher's store would
    read the old group's addresses there (gloo: "connection refused"). The timeout covers a process
    waiting at a stage's end for a slower one."""
    if share.world <= 1:
        return
    import datetime

    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=6))


def run_spec(spec: JobSpec, job_dir: Path) -> int:
    """Every stage of the job; its exit code."""
    share = Share.of()
    if share.world > 1:
        # each process uses cuda:LOCAL_RANK (or the CPU): the trainer refuses --device under a launcher
        spec = dataclasses.replace(spec, train={k: v for k, v in spec.train.items() if k != "device"})
        join_group(share)
    events = EventLog(job_dir / (EVENTS_FILE if share.reporter else f"events.rank{share.rank}.jsonl"),
                      echo=share.reporter)
    events.emit(START, job=spec.job_id, method=spec.method, base=spec.base, steps=spec.train.get("steps"),
                run_dir=str(job_dir), processes=share.world)
    resume = (job_dir / TRAIN_DIR).exists()
    try:
        if spec.method in PHOTO_METHODS:
            data = annotate_stage(spec, job_dir, events, pose=spec.method == CONTROLNET_METHOD)
        else:
            data = pairs_stage(spec, job_dir, events)
        share.barrier()  # rank 0 has merged the records every process trains on
        trained = train_stage(spec, job_dir, events, data, resume)
        if not share.reporter:
            return 0
        files = finish_weights(spec, trained)
        try:
            plot = plot_job(job_dir)
        except Exception as err:  # a plot is a convenience: the LoRA is what the job owes
            events.emit(WARNING, message=f"no loss plot: {type(err).__name__}: {err}")
            plot = None
        # the done event's keys are the job protocol's (a ControlNet's file is its "lora" too)
        events.emit(DONE, **files, lora_name=spec.output_listed, steps=trained["steps"],
                    run_lora=str(trained["file"]), plot=str(plot) if plot else None)
        return 0
    except Cancelled as stop:
        step = stop.args[0] if stop.args else None
        events.emit(CANCELLED, step=step, message="cancelled, resumable: queue the same output_name with the "
                                                  "same settings to continue")
        return 3
    except StageFailed as err:
        events.emit(ERROR, message=str(err))
        return err.code
    except Exception as err:
        events.emit(ERROR, message=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
        return 1


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _raise_cancelled)
    signal.signal(signal.SIGINT, _raise_cancelled)
    try:
        spec = JobSpec.read(args.spec)
    except SpecError as err:  # refused: said in the job's events too, when the spec names its folder
        print(f"error: {err}", file=sys.stderr)
        job_dir = _job_dir_of(args.spec)
        if job_dir is not None:
            EventLog(job_dir / EVENTS_FILE, echo=False).emit(ERROR, message=str(err))
        return 2
    return run_spec(spec, Path(spec.job_dir))


def _job_dir_of(path: Path) -> Path | None:
    """The job folder a refused spec names, if it names one that exists."""
    try:
        folder = json.loads(path.read_text(encoding="utf-8")).get("job_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(folder) if isinstance(folder, str) and Path(folder).is_dir() else None
