"""The pack's one file-I/O layer: crash-safe writes, JSON lines, and the job event log.

Used the same way by the trainers (writers) and by the ComfyUI nodes (readers), so it imports
nothing but the standard library and works as ``<pack>.core.fileio`` and as ``core.fileio``.

- **Atomic writes**: a file is either its old complete version or its new complete one. Write to
  a temporary name in the target's folder, fsync it, rename it over the target (atomic on POSIX
  and Windows), fsync the folder so the rename survives a crash.
- **JSON lines**: an append-only writer (one ``write`` per record, flushed) and one reader. A
  writer killed mid-line leaves a *torn last line*; the reader ignores exactly that, and any
  other bad line is an error ``file:line: reason``. A writer reopening a file first cuts a torn
  tail off, so the next record never fuses with it.
- **Events**: the job protocol — event names, ``EventLog`` (the trainer side) and ``EventTail``
  (the node side: only what was appended since the last read, never a half-written line).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path


# ---- atomic writes ------------------------------------------------------------------------
def _fsync_folder(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # folders cannot be opened for fsync on Windows
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside ``target``; when the block succeeds it replaces ``target``.
    A failure (or a full disk) leaves the old file, or none, and no stray temporary."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; others (ComfyUI, a web server) read ours
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(finite(data), indent=2, sort_keys=True, default=str))


def write_jsonl_atomic(path: str | os.PathLike, records) -> None:
    """Rewrite a whole JSON-lines file (e.g. sorted, one record per key) atomically."""
    write_text_atomic(path, "".join(_line(r) for r in records))


# ---- JSON lines ---------------------------------------------------------------------------
class JsonlError(ValueError):
    """A bad line that is not a torn last line; the message is ``file:line: reason``."""


def finite(value):
    """JSON has no NaN/inf: report them as strings a reader can still show."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _line(record: dict) -> str:
    return json.dumps(finite(record), ensure_ascii=False, default=str) + "\n"


def _parse(text: str, where: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise JsonlError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise JsonlError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def parse_jsonl(data: bytes, name: str = "<jsonl>", first_line: int = 1, *,
                whole_file: bool = True) -> tuple[list[dict], int]:
    """Records of the lines in ``data`` and how many bytes they span. A last line without its
    newline is a torn line if it does not parse (its writer was killed on it) and is left
    unconsumed; with ``whole_file=False`` (tailing a live file) it is left unconsumed even if it
    parses, since its writer may still be on it. A bad complete line raises ``JsonlError``."""
    records, used, number = [], 0, first_line
    while used < len(data):
        end = data.find(b"\n", used)
        last = end < 0
        raw = data[used:] if last else data[used:end]
        text = raw.decode("utf-8", errors="replace").strip()
        if last and not whole_file:
            return records, used
        if text:
            try:
                records.append(_parse(text, f"{name}:{number}"))
            except JsonlError:
                if last:
                    return records, used  # torn last line: not (yet) a record
                raise
        elif last:
            return records, used
        used = len(data) if last else end + 1
        number += 1
    return records, used


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSON-lines file ([] when it does not exist). Blank lines are skipped, a
    torn last line is ignored, any other bad line raises ``JsonlError`` naming file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    return parse_jsonl(path.read_bytes(), str(path))[0]


class JsonlWriter:
    """Appends records, one ``write`` and a flush each (``sync=True`` also fsyncs), so a reader
    tailing the file sees whole lines. Opening cuts off a torn last line left by a killed writer."""

    def __init__(self, path: str | os.PathLike, sync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sync = sync
        repair_torn_tail(self.path)

    def append(self, record: dict) -> dict:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(_line(record))
            handle.flush()
            if self.sync:
                os.fsync(handle.fileno())
        return record


def repair_torn_tail(path: Path) -> bool:
    """Truncate a file to its last newline; True if a torn tail was removed."""
    if not path.is_file():
        return False
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return False
        handle.seek(max(0, size - 1))
        if handle.read(1) == b"\n":
            return False
        # find the last newline (files here are small enough to scan back in chunks)
        pos, keep = size, 0
        while pos > 0:
            step = min(65536, pos)
            handle.seek(pos - step)
            chunk = handle.read(step)
            found = chunk.rfind(b"\n")
            if found >= 0:
                keep = pos - step + found + 1
                break
            pos -= step
        handle.truncate(keep)
    return True


# ---- the job event protocol ------------------------------------------------------------------
EVENTS_FILE = "events.jsonl"

# event names: every event is {"event": NAME, "time": unix seconds, ...fields}
START = "start"  # method, base, steps, run_dir, resume
STAGE = "stage"  # name (annotate | build-pairs | train), before a job's stage begins
PROGRESS = "progress"  # step, total, losses{}, weights[], grad_norm, lr, it_per_s, eta_s
RESUME = "resume"  # step, checkpoint
CHECKPOINT = "checkpoint"  # step, path
SAMPLE = "sample"  # step, paths[]
EVAL = "eval"  # step, method-specific numbers
VALIDATION = "validation"  # step, metric, score, scores{}, best_step, best_score, best_path, face/hand_confidence
NAN = "nan"  # step, streak, total
WARNING = "warning"  # message
DONE = "done"  # lora (or output), steps
ERROR = "error"  # message, traceback
CANCELLED = "cancelled"  # step
FINAL_EVENTS = (DONE, ERROR, CANCELLED)


class EventLog:
    """The trainer's side: appends events to ``events.jsonl``; ``echo`` also prints a human line."""

    def __init__(self, path: str | os.PathLike, echo: bool = True):
        self.writer = JsonlWriter(path)
        self.path = self.writer.path
        self.echo = echo

    def emit(self, event: str, **fields) -> dict:
        record = self.writer.append({"event": event, "time": round(time.time(), 3), **fields})
        if self.echo:
            print(describe(record), flush=True)
        return record


def read_events(path: str | os.PathLike) -> list[dict]:
    return read_jsonl(path)


class EventTail:
    """The reader's side: ``read()`` returns the events appended since the previous call, never
    a line the writer has not finished."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset = 0
        self.line = 1

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        records, used = parse_jsonl(data, str(self.path), self.line, whole_file=False)
        self.offset += used
        self.line += data[:used].count(b"\n")
        return records


def describe(record: dict) -> str:
    """One human-readable line for an event (the trainer's console, the node's log)."""
    kind = record.get("event")
    if kind == PROGRESS:
        losses = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in (record.get("losses") or {}).items())
        weights = record.get("weights")
        wtxt = f" w={[round(w, 3) for w in weights]}" if weights else ""
        eta = record.get("eta_s")
        return (f"[{record.get('step')}/{record.get('total')}] {losses}{wtxt} "
                f"{record.get('it_per_s') or 0:.2f} it/s ETA {eta or 0:.0f}s")
    extra = {k: v for k, v in record.items() if k not in ("event", "time", "traceback")}
    return f"[{kind}] " + json.dumps(extra, default=str)[:300]
