"""Training jobs launched from the nodes: a queue per device, spawn, tail, state, records.

A job is a folder under the runs folder, named after its sanitized output name (so queueing the
same name again resumes it): ``spec.json`` (what to do: a ``core.job_spec.JobSpec``), ``job.json`` (the record: id, state,
settings, pid), ``job.log`` (the process's stdout/stderr), ``events.jsonl`` (written by the job,
read here through ``core.fileio.EventTail``) and the trainer's run directory ``train/``.

**The queue.** A job owns its devices (one, or several for a data-parallel job) while it runs; one
queued while any of them is busy waits, in state ``queued``, in ``<runs>/.queue/`` (its record
and spec, nothing in its run folder yet: a cancel while queued leaves nothing behind, and an
``overwrite`` only clears the run folder when the job starts). Jobs start in the order they
were queued: a job never overtakes an earlier one that shares a device with it, so a job on
cuda:0,1 is not starved by single-GPU jobs. The queue survives a restart of ComfyUI: queued jobs
are read back and started in order. Only a job that could never start (a device this machine
does not have, an output_name already queued or running) is refused.

The job runs as ``[sys.executable, "-m", "trainers", "job", spec.json]`` — an argument list, the
pack root as working directory and PYTHONPATH, offline flags, its own process group — so nothing
of ``trainers`` is imported into ComfyUI; on several devices the same command runs under
``torch.distributed.run`` with one process per device. One polling thread follows every running
job, updates its summary, starts queued jobs as devices free and hands each event to ``notify``
(the browser push). Nothing here imports ComfyUI: the ComfyUI bindings are passed in (see
``comfy_manager``).
"""
from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from ..core.fileio import (CANCELLED, DONE, ERROR, EVENTS_FILE, PROGRESS, STAGE, VALIDATION, WARNING, EventTail,
                           JsonlError, write_json_atomic)
from ..core.job_spec import DevicesError, JobSpec, SpecError, device_list, settings_differences
from .job_paths import InputRefused, inside

log = logging.getLogger("fairhuman-hgdpo")

PACK_ROOT = Path(__file__).resolve().parents[1]
RECORD, SPEC, LOG = "job.json", "spec.json", "job.log"
QUEUE_DIR = ".queue"  # in the runs folder (no output_name starts with a dot): <id>.json + <id>.spec.json
ACTIVE = ("queued", "running")
# interrupted: the record said running but its process was gone when the manager started
STATES = ("queued", "running", "done", "error", "cancelled", "interrupted")
JOB_ID = re.compile(r"^[0-9a-f]{12}$")
# A cancelled trainer saves a checkpoint after the step in flight and exits 3. A step longer than
# this (a big model on a CPU) is not waited for: the process group is killed, so a cancel always
# ends within 10 s, and the run resumes from its last periodic checkpoint.
CANCEL_GRACE_S = 8.0
RECENT_EVENTS = 50
STATE_EVENT = "state"  # the manager's own event (to the browser): a job's state changed


class JobRefused(InputRefused):
    """A job that could never start (a device this machine lacks, its output_name already queued or
    running, settings differing from the run to resume)."""


def job_environment(pack_root: Path) -> dict:
    """The job's environment: the pack importable, output unbuffered, no hub, no telemetry."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(pack_root), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1",
               PYTHONIOENCODING="utf-8")
    return env


def visible_devices() -> list[str]:
    """The devices this machine has: the CPU and every GPU torch sees."""
    import torch

    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0))]


def launch_command(python: str, spec_path: Path, devices: list[str]) -> tuple[list[str], dict]:
    """(argv, environment changes) of a job on ``devices``: one process, or one per device under
    torch.distributed.run (``--standalone``: it picks a free port itself). Each process of a group
    finds its device from LOCAL_RANK among CUDA_VISIBLE_DEVICES (none for CPU processes, which
    join a gloo group)."""
    job = ["-m", "trainers", "job", str(spec_path)]
    if len(devices) == 1:
        return [python, *job], {}
    argv = [python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
            str(len(devices)), *job]
    if devices[0] == "cpu":
        return argv, {"CUDA_VISIBLE_DEVICES": ""}
    indices = [int(d.split(":")[1]) for d in devices]
    # cuda:N is ComfyUI's numbering, itself inside any CUDA_VISIBLE_DEVICES it was started with
    outer = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = [outer[i] if i < len(outer) else str(i) for i in indices] if outer else [str(i) for i in indices]
    return argv, {"CUDA_VISIBLE_DEVICES": ",".join(physical)}


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process reusing the number
        return False
    try:  # a zombie or a reused pid is not our job
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return b"trainers" in cmdline and b"job" in cmdline
    except (OSError, IndexError):
        return True  # no /proc (not Linux): trust the signal check


class Job:
    """One job: its record (persisted in job.json, or in the queue folder while queued) and what
    its events said so far."""

    def __init__(self, record: dict, job_dir: Path, record_path: Path | None = None):
        self.record = record
        self.dir = Path(job_dir)
        self.record_path = Path(record_path) if record_path else self.dir / RECORD
        self.proc: subprocess.Popen | None = None
        self.tail = EventTail(self.dir / EVENTS_FILE)
        self.recent: collections.deque = collections.deque(maxlen=RECENT_EVENTS)
        self.finished = threading.Event()
        self.step, self.total, self.losses, self.eta_s, self.stage = 0, None, {}, None, None
        self.validation: dict | None = None  # the latest validation event's numbers
        self.queue_position: int | None = None  # 1-based among the jobs waiting for its devices
        self.queued_behind: str | None = None  # the id of the job it waits for
        if record["state"] not in ACTIVE:
            self.finished.set()

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def state(self) -> str:
        return self.record["state"]

    @property
    def devices(self) -> list[str]:
        return self.record.get("devices") or [self.record.get("device")]

    def apply(self, event: dict) -> None:
        """Fold one event into the summary."""
        kind = event.get("event")
        slim = {k: v for k, v in event.items() if k != "traceback"}
        self.recent.append(slim)
        if kind == STAGE:
            self.stage, self.step, self.total, self.eta_s = event.get("name"), 0, None, None
        elif kind == PROGRESS:
            self.stage = event.get("stage", self.stage)
            self.step, self.total = event.get("step", self.step), event.get("total", self.total)
            self.eta_s = event.get("eta_s")
            if event.get("losses"):
                self.losses = event["losses"]
        elif kind == VALIDATION:
            self.validation = {k: event.get(k) for k in ("step", "metric", "score", "best_step", "best_score")}
        elif kind == DONE:
            self.record.update(state="done", lora_path=event.get("lora"), plot=event.get("plot"), error=None,
                               best_lora=event.get("best_lora"), best_lora_name=event.get("best_lora_name"))
            self.eta_s = 0
        elif kind == ERROR:
            self.record.update(state="error", error=event.get("message") or "the job failed (see job.log)")
        elif kind == CANCELLED:
            self.record.update(state="cancelled", error=event.get("message") or "cancelled, resumable")
        elif kind == WARNING:
            self.record.setdefault("warnings", []).append(event.get("message"))

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _pid_alive(self.record.get("pid"))

    def summary(self) -> dict:
        r = self.record
        return {"id": r["id"], "method": r["method"], "state": r["state"], "step": self.step, "total": self.total,
                "losses": self.losses, "eta_s": self.eta_s, "lora_name": r.get("lora_name"),
                "run_dir": str(self.dir), "error": r.get("error"), "stage": self.stage,
                "output_name": r.get("output_name"), "device": r.get("device"), "devices": self.devices,
                "created": r.get("created"), "finished": r.get("finished"), "warnings": r.get("warnings", [])[-5:],
                "queue_position": self.queue_position, "queued_behind": self.queued_behind,
                "validation": self.validation, "plot": r.get("plot"), "best_lora_name": r.get("best_lora_name")}

    def details(self) -> dict:
        return {**self.summary(), "events": list(self.recent), "log": str(self.dir / LOG)}

    def save(self) -> None:
        write_json_atomic(self.record_path, self.record)


class JobManager:
    def __init__(self, runs_root: str | os.PathLike, *, python: str = sys.executable, pack_root: Path = PACK_ROOT,
                 notify=None, on_finished=None, poll_interval: float = 0.25, devices=visible_devices):
        self.runs_root = Path(runs_root)
        self.queue_dir = self.runs_root / QUEUE_DIR
        self.python, self.pack_root = python, Path(pack_root)
        self.notify = notify or (lambda summary, event: None)
        self.on_finished = on_finished or (lambda job: None)
        self.poll_interval = poll_interval
        self.visible_devices = devices  # () -> the device names this machine has
        self.lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        self.stopping = False  # ComfyUI is exiting: start nothing more
        self._thread: threading.Thread | None = None
        self.load_records()

    # ---- records ------------------------------------------------------------------------------
    def load_records(self) -> None:
        """Read every job folder; a job recorded as running whose process is gone becomes
        ``interrupted`` (resumable); one still running is followed again. Then the queue: its
        jobs start in their order as their devices are free."""
        if not self.runs_root.is_dir():
            return
        for folder in sorted(self.runs_root.iterdir()):
            path = folder / RECORD
            if folder.is_symlink() or not path.is_file():
                continue
            record = self._read_record(path)
            if record is None:
                continue
            recorded = record["state"]
            job = Job(record, folder)
            try:
                for event in job.tail.read():  # the summary (step, losses) from the job's own events
                    job.apply(event)
            except JsonlError as err:
                log.warning("fairhuman: %s", err)
            if recorded in ACTIVE:
                if _pid_alive(record.get("pid")):  # still training: follow it again
                    record["state"] = "running"
                elif job.state in ACTIVE:
                    record.update(state="interrupted", error=(
                        "interrupted (resumable): its process ended while ComfyUI was not watching; queue the "
                        "same output_name with the same settings to continue from the last checkpoint"))
                if job.state not in ACTIVE:  # ended while ComfyUI was down (final event or none)
                    record["finished"] = record.get("finished") or time.time()
                    job.finished.set()
                    job.save()
            self.jobs[job.id] = job
        for path in sorted(self.queue_dir.glob("*.json")) if self.queue_dir.is_dir() else []:
            if path.name.endswith(".spec.json"):
                continue
            record = self._read_record(path)
            if record is None or record["state"] != "queued":
                continue
            job = Job(record, self.job_dir(record["output_name"]), record_path=path)
            if any(other.dir == job.dir and other.state in ACTIVE for other in self.jobs.values()):
                log.warning("fairhuman: queued job %s: its run folder is in use by another job; dropped", job.id)
                self._unqueue(job)
                continue
            self.jobs[job.id] = job
        with self.lock:
            self._schedule()
        if any(j.state in ACTIVE for j in self.jobs.values()):
            self._ensure_thread()

    @staticmethod
    def _read_record(path: Path) -> dict | None:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not JOB_ID.match(str(record.get("id"))) or record.get("state") not in STATES:
                raise ValueError("not a job record")
            return record
        except (OSError, ValueError) as err:
            log.warning("fairhuman: skipping job record %s: %s", path, err)
            return None

    def job(self, job_id: str) -> Job | None:
        """The job with this id (ids are matched, never used as paths)."""
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            return None
        return self.jobs.get(job_id)

    def list(self) -> list[dict]:
        with self.lock:
            jobs = sorted(self.jobs.values(), key=lambda j: j.record.get("created", 0), reverse=True)
            return [j.summary() for j in jobs]

    def job_dir(self, name: str) -> Path:
        folder = self.runs_root / name
        if not inside(folder, self.runs_root) or folder.resolve().parent != self.runs_root.resolve():
            raise InputRefused(f"output_name {name!r} does not name a folder inside {self.runs_root}")
        return folder

    def holding(self, device: str) -> Job | None:
        """The started job that owns ``device``: until it is settled and its process has exited."""
        for job in self.jobs.values():
            if device in job.devices and job.state != "queued" and (not job.finished.is_set() or job.alive()):
                return job
        return None

    def previous_record(self, name: str) -> dict | None:
        path = self.job_dir(name) / RECORD
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError):
            return None

    # ---- queueing -----------------------------------------------------------------------------
    def devices_of(self, device: str, devices: str = "") -> list[str]:
        """The devices a job asks for (``core.job_spec.device_list``), or JobRefused when this
        machine lacks one: such a job could never start."""
        visible = self.visible_devices()
        try:
            wanted = device_list(devices, device, sum(d.startswith("cuda") for d in visible))
        except DevicesError as err:
            raise JobRefused(str(err)) from None
        missing = sorted({d for d in wanted if d not in visible})
        if missing:
            raise JobRefused(f"device {', '.join(missing)} does not exist on this machine (it has "
                             f"{', '.join(visible)}): the job could never start")
        return wanted

    def check(self, *, name: str, device: str, settings: dict, overwrite: bool, devices: str = "") -> None:
        """Refuse a job that could never start, before anything is written. A busy device is no
        reason: the job waits in the queue."""
        with self.lock:
            self.devices_of(device, devices)
            folder = self.job_dir(name)
            for other in self.jobs.values():
                if other.dir == folder and other.state in ACTIVE:
                    raise JobRefused(
                        f"output_name {name!r} is already {other.state} as training job {other.id}: wait for it, "
                        f"cancel it (jobs panel, or POST /fairhuman/jobs/{other.id}/cancel), or pick another "
                        f"output_name")
            previous = self.previous_record(name)
            if previous and not overwrite:
                changed = settings_differences(previous.get("settings", {}), settings)
                if changed:
                    raise JobRefused(
                        f"output_name {name!r} already has a run with other settings ({'; '.join(changed)}): "
                        f"queue it with the same settings to resume it, pick another output_name, or set "
                        f"overwrite to true to start over")

    def submit(self, spec: JobSpec, *, name: str, device: str, settings: dict, overwrite: bool) -> Job:
        """Queue the job ``spec`` describes (after ``check``, again under the lock) and start it if
        its devices are free; returns it, running or queued. ``settings`` (the node's inputs) are
        recorded, to compare with when the name is queued again."""
        with self.lock:
            self.check(name=name, device=device, settings=settings, overwrite=overwrite, devices=spec.devices)
            folder = self.job_dir(name)
            job_id = uuid.uuid4().hex[:12]
            seq = 1 + max((j.record.get("queue_seq", 0) for j in self.jobs.values()), default=0)
            # lora_name / lora_path: the jobs API's names of the trained file (a ControlNet's too)
            record = {"id": job_id, "method": spec.method, "output_name": name, "device": device,
                      "devices": self.devices_of(device, spec.devices), "state": "queued", "queue_seq": seq,
                      "overwrite": overwrite, "settings": settings, "lora_name": spec.output_listed,
                      "lora_path": None, "error": None, "created": time.time(), "finished": None, "pid": None,
                      "exit_code": None}
            self.queue_dir.mkdir(parents=True, exist_ok=True)
            job = Job(record, folder, record_path=self.queue_dir / f"{job_id}.json")
            spec.with_job(job_id, folder).write(self._queued_spec(job))
            job.save()
            self.jobs[job_id] = job
            self._schedule()
            if job.state == "queued":
                self._emit(job, {"event": STATE_EVENT, "state": "queued"})
            self._ensure_thread()
            return job

    def _queued_spec(self, job: Job) -> Path:
        return self.queue_dir / f"{job.id}.spec.json"

    def _unqueue(self, job: Job) -> None:
        (self.queue_dir / f"{job.id}.json").unlink(missing_ok=True)
        self._queued_spec(job).unlink(missing_ok=True)

    def _schedule(self) -> None:
        """Start every queued job whose devices are free, in queue order (under the lock); a job
        never overtakes an earlier one sharing a device. Then number the ones left waiting."""
        queued = sorted((j for j in self.jobs.values() if j.state == "queued"), key=lambda j: j.record["queue_seq"])
        claimed: dict[str, Job] = {}  # device -> the job ahead on it (running, or queued earlier)
        for device in {d for j in queued for d in j.devices}:
            holder = self.holding(device)
            if holder is not None:
                claimed[device] = holder
        for job in queued:
            ahead = [claimed[d] for d in job.devices if d in claimed]
            if not ahead and not self.stopping:
                self._start(job)
            for device in job.devices:
                claimed[device] = job
        waiting = [j for j in queued if j.state == "queued"]
        for job in waiting:
            earlier = [j for j in waiting if j.record["queue_seq"] < job.record["queue_seq"]
                       and set(j.devices) & set(job.devices)]
            job.queue_position = len(earlier) + 1
            behind = earlier[-1] if earlier else next(filter(None, map(self.holding, job.devices)), None)
            job.queued_behind = behind.id if behind is not None else None

    def _start(self, job: Job) -> None:
        """Move a queued job into its run folder and spawn it."""
        folder, record = job.dir, job.record
        try:
            spec = JobSpec.read(self._queued_spec(job))
        except SpecError as err:  # a pack upgraded under a waiting job
            self._unqueue(job)
            record.update(state="error", error=str(err), finished=time.time())
            job.finished.set()
            self._emit(job, {"event": STATE_EVENT, "state": "error"})
            return
        if record.get("overwrite") and folder.exists():
            shutil.rmtree(folder)  # inside the runs folder: checked by job_dir
        folder.mkdir(parents=True, exist_ok=True)
        spec.write(folder / SPEC)
        for old in [j for j in self.jobs.values() if j.dir == folder and j is not job]:
            del self.jobs[old.id]  # one record per run folder: the newest attempt
        job.tail = EventTail(folder / EVENTS_FILE)
        job.tail.read()  # a resumed run's earlier events are history, not this job's
        job.record_path = folder / RECORD
        record.update(state="running", started=time.time())
        job.queue_position = job.queued_behind = None
        argv, env = launch_command(self.python, folder / SPEC, job.devices)
        try:
            with open(folder / LOG, "ab") as log_file:
                job.proc = subprocess.Popen(
                    argv, cwd=str(self.pack_root), env={**job_environment(self.pack_root), **env}, stdout=log_file,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:
            record.update(state="error", error=f"the job could not start: {err}", finished=time.time())
            job.finished.set()
        else:
            record["pid"] = job.proc.pid
        job.save()
        self._unqueue(job)
        self._emit(job, {"event": STATE_EVENT, "state": record["state"]})

    # ---- following ----------------------------------------------------------------------------
    def _emit(self, job: Job, event: dict) -> None:
        try:
            self.notify(job.summary(), event)
        except Exception as err:  # a closed browser must not stop the job's bookkeeping
            log.debug("fairhuman: notify failed: %s", err)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._follow, name="fairhuman-jobs", daemon=True)
            self._thread.start()

    def _follow(self) -> None:
        while True:
            with self.lock:
                active = [j for j in self.jobs.values() if j.state != "queued" and not j.finished.is_set()]
                queued = any(j.state == "queued" for j in self.jobs.values())
                if not active and not queued:
                    return
                if queued:  # a device may have been freed by a process no one follows (an earlier session's)
                    self._schedule()
            for job in active:
                try:
                    with self.lock:  # cancel() may poll the same job from a request thread
                        self.poll(job)
                except Exception:
                    log.exception("fairhuman: following job %s failed", job.id)
            time.sleep(self.poll_interval)

    def poll(self, job: Job) -> None:
        """Read the job's new events; settle its state once its process has exited."""
        exited = not job.alive()
        try:
            events = job.tail.read()
        except JsonlError as err:
            log.warning("fairhuman: job %s: %s", job.id, err)
            events = []
        for event in events:
            job.apply(event)
            self._emit(job, event)
        if exited:
            self._settle(job)

    def _settle(self, job: Job) -> None:
        if job.finished.is_set():
            return
        code = job.proc.returncode if job.proc is not None else None
        record = job.record
        if record["state"] in ACTIVE:  # no final event: the process died (killed, crashed)
            record["state"] = "cancelled" if record.get("cancel_requested") else "error"
            record["error"] = (
                "cancelled, resumable: it stopped in the middle of a step and resumes from its last "
                "checkpoint (checkpoint_every)"
                if record.get("cancel_requested") else
                f"the job process exited with code {code} without a final event: see {job.dir / LOG}")
        if record["state"] == "done" and not (record.get("lora_path") and os.path.isfile(record["lora_path"])):
            record.update(state="error", error=f"the job reported done but {record.get('lora_path')} does not exist")
        record.update(exit_code=code, finished=time.time())
        job.save()
        job.finished.set()
        self._emit(job, {"event": STATE_EVENT, "state": record["state"]})
        try:
            self.on_finished(job)
        except Exception:
            log.exception("fairhuman: after job %s", job.id)
        self._schedule()  # its devices are free: the next in the queue starts

    # ---- stopping -----------------------------------------------------------------------------
    def cancel(self, job_id: str, grace: float = CANCEL_GRACE_S) -> Job:
        """A queued job leaves the queue and nothing of it stays (its record is dropped too).
        A running one: SIGTERM its process group (the trainer saves a checkpoint and exits 3);
        SIGKILL it if it is still there after ``grace`` seconds. Returns the job, settled."""
        job = self.job(job_id)
        if job is None:
            raise KeyError(job_id)
        with self.lock:
            if job.state == "queued":
                self._unqueue(job)
                del self.jobs[job.id]
                job.record.update(state="cancelled", error="cancelled while queued: nothing had run",
                                  finished=time.time())
                job.queue_position = job.queued_behind = None
                job.finished.set()
                self._emit(job, {"event": STATE_EVENT, "state": "cancelled"})
                self._schedule()  # the jobs behind it move up
                return job
        if job.finished.is_set() and not job.alive():
            return job
        job.record["cancel_requested"] = True
        self._signal(job, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while job.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if job.alive():
            log.warning("fairhuman: job %s still in a training step %.0f s after SIGTERM: stopping it; it "
                        "resumes from its last checkpoint", job.id, grace)
            job.record["killed"] = True
            self._signal(job, signal.SIGKILL)
            while job.alive():
                time.sleep(0.05)
        with self.lock:
            if not job.finished.is_set():
                self.poll(job)
        job.finished.wait(5)
        return job

    @staticmethod
    def _signal(job: Job, sig) -> None:
        pid = job.proc.pid if job.proc is not None else job.record.get("pid")
        try:
            os.killpg(pid, sig)  # its own session: the group holds the job and its workers
        except (ProcessLookupError, PermissionError, TypeError):
            pass

    def stop_all(self) -> None:
        """At ComfyUI's exit: start nothing more (the queue stays for the next start), and ask
        running jobs to checkpoint and stop (resumable), briefly."""
        with self.lock:
            self.stopping = True
        for job in list(self.jobs.values()):
            if job.proc is not None and job.alive():
                self._signal(job, signal.SIGTERM)


# ---- the ComfyUI-bound instance -------------------------------------------------------------------
_manager: JobManager | None = None
_manager_lock = threading.Lock()


def comfy_manager() -> JobManager:
    """The manager of this ComfyUI: runs under ``<output>/fairhuman_runs``, events pushed to
    the browser as ``fairhuman.job`` messages, the LoRA and ControlNet lists refreshed when a job ends."""
    global _manager
    with _manager_lock:
        if _manager is None:
            import folder_paths

            from .job_paths import RUNS_FOLDER

            _manager = JobManager(Path(folder_paths.get_output_directory()) / RUNS_FOLDER,
                                  notify=_push_to_browser, on_finished=_refresh_model_lists)
            atexit.register(_manager.stop_all)
        return _manager


def _push_to_browser(summary: dict, event: dict) -> None:
    from server import PromptServer

    PromptServer.instance.send_sync("fairhuman.job", {**summary, "event": event})


def _refresh_model_lists(job: Job) -> None:
    """folder_paths re-scans on a folder mtime change; drop the cache too, so a LoRA or ControlNet
    copied within the same mtime tick is listed (same cache in ComfyUI 0.3.64 and 0.8.0)."""
    import folder_paths

    for kind in ("loras", "controlnet"):
        folder_paths.filename_list_cache.pop(kind, None)
