"""The training-job side of the nodes without ComfyUI: input safety (job_paths) and the job
manager running real ``python -m trainers job`` processes on the tiny SD1.5-shaped model: its
queue per device, its restart, jobs on two CPU processes (torch.distributed.run, gloo)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_helpers import import_pack, make_region_dataset

from core.job_spec import JobSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paths():
    return import_pack("nodes.job_paths")


@pytest.fixture(scope="module")
def jm():
    return import_pack("nodes.job_manager")


# ---- input safety ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "..", "x..y", ".hidden", "", "a" * 101, "c:evil"])
def test_output_name_must_be_plain(paths, bad):
    with pytest.raises(paths.InputRefused, match="output_name"):
        paths.sanitize_output_name(bad)


def test_output_name_keeps_plain_names(paths):
    assert paths.sanitize_output_name(" my hands_v2.safetensors ") == "my hands_v2"


@pytest.fixture
def input_dir(tmp_path):
    root = tmp_path / "input"
    (root / "my photos").mkdir(parents=True)
    (root / "my photos" / "a.jpg").write_bytes(b"jpg")
    (root / "empty").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "b.png").write_bytes(b"png")
    (root / "link out").symlink_to(tmp_path / "outside", target_is_directory=True)
    return root


def test_dataset_inside_input_resolves(paths, input_dir):
    assert paths.resolve_dataset("my photos", input_dir) == (input_dir / "my photos").resolve()
    assert paths.resolve_dataset(str(input_dir / "my photos"), input_dir) == (input_dir / "my photos").resolve()


@pytest.mark.parametrize("bad", ["../../etc", "/etc", "link out", "my photos/../../outside"])
def test_dataset_outside_allowed_roots_is_refused(paths, input_dir, bad, monkeypatch):
    monkeypatch.delenv(paths.ALLOWED_ROOTS_ENV, raising=False)
    with pytest.raises(paths.InputRefused, match="outside the allowed folders"):
        paths.resolve_dataset(bad, input_dir)


def test_allowed_roots_variable_admits_a_folder(paths, input_dir, monkeypatch):
    outside = input_dir.parent / "outside"
    monkeypatch.setenv(paths.ALLOWED_ROOTS_ENV, str(outside))
    assert paths.resolve_dataset(str(outside), input_dir) == outside.resolve()
    assert paths.resolve_dataset("link out", input_dir) == outside.resolve()


def test_folder_without_images_is_refused(paths, input_dir):
    with pytest.raises(paths.InputRefused, match="has no images"):
        paths.resolve_dataset("empty", input_dir)
    with pytest.raises(paths.InputRefused, match="not a folder"):
        paths.resolve_dataset("missing", input_dir)


# ---- the manager ---------------------------------------------------------------------------------
def _job_spec(tmp_path: Path, name: str, method: str, folder: str = "loras", **fields) -> JobSpec:
    """A spec as the Train nodes write it, on the tiny SD1.5 model, the file going to
    ``tmp_path/<folder>/fairhuman/<name>.safetensors``."""
    return JobSpec(method=method, base="tiny-sd15", output_file=f"{name}.safetensors",
                   output_listed=f"fairhuman/{name}.safetensors",
                   output_dest=str(tmp_path / folder / "fairhuman" / f"{name}.safetensors"), **fields)


def _spec(tmp_path: Path, name: str, steps: int, **train) -> JobSpec:
    data = tmp_path / "data"
    if not data.exists():
        make_region_dataset(data, count=2, size=64)
    return _job_spec(tmp_path, name, "fairhuman", dataset=str(data), train={
        "steps": steps, "resolution": 64, "rank": 4, "lr": 1e-3, "mixed_precision": "no", "checkpoint_every": 1,
        "seed": 0, **train})


def _submit(manager, tmp_path, name, steps, **train):
    spec = _spec(tmp_path, name, steps, **train)
    return manager.submit(spec, name=name, device="cpu", settings=dict(spec.train), overwrite=False)


@pytest.mark.slow
def test_job_trains_reports_and_keeps_a_record(jm, tmp_path):
    seen = []
    manager = jm.JobManager(tmp_path / "runs", notify=lambda summary, event: seen.append((summary, event)))
    job = _submit(manager, tmp_path, "hands", 2)
    assert job.finished.wait(300), job.dir.joinpath("job.log").read_text()[-3000:]
    assert job.state == "done", job.record
    assert Path(job.record["lora_path"]) == tmp_path / "loras" / "fairhuman" / "hands.safetensors"
    assert Path(job.record["lora_path"]).is_file() and Path(job.record["plot"]).is_file()
    summary = manager.list()[0]
    assert {"id", "method", "state", "step", "total", "losses", "eta_s", "lora_name", "run_dir",
            "error"} <= set(summary)
    assert summary["step"] == summary["total"] == 2 and set(summary["losses"]) == {"global", "face", "hand"}
    progress = [s["step"] for s, e in seen if e.get("event") == "progress" and e.get("stage") == "train"]
    assert progress == [1, 2]
    assert seen[-1][1] == {"event": "state", "state": "done"} and seen[-1][0]["state"] == "done"
    record = json.loads((job.dir / "job.json").read_text())
    assert record["state"] == "done" and record["exit_code"] == 0
    # the record survives a restart of the manager (ComfyUI)
    again = jm.JobManager(tmp_path / "runs")
    assert again.job(job.id).state == "done" and again.job(job.id).step == 2


@pytest.mark.slow
def test_cancel_stops_within_10_s_and_the_device_is_free_again(jm, tmp_path):
    manager = jm.JobManager(tmp_path / "runs")
    job = _submit(manager, tmp_path, "long", 500)
    deadline = time.monotonic() + 240
    while job.step < 1 and time.monotonic() < deadline:  # training, past its first step
        time.sleep(0.2)
    assert job.step >= 1, job.dir.joinpath("job.log").read_text()[-3000:]
    with pytest.raises(jm.JobRefused, match=f"output_name 'long' is already running as training job {job.id}"):
        manager.check(name="long", device="cpu", settings=job.record["settings"], overwrite=False)
    started = time.monotonic()
    manager.cancel(job.id)
    assert time.monotonic() - started < 10 and not job.alive()
    assert job.state == "cancelled" and "resumable" in job.record["error"]
    assert list((job.dir / "train" / "checkpoints").glob("step_*.pt"))
    assert manager.holding("cpu") is None  # free again
    # the same name with other settings: refused, naming what differs
    with pytest.raises(jm.JobRefused, match=r"rank: 4 -> 8"):
        manager.check(name="long", device="cpu", settings={**job.record["settings"], "rank": 8}, overwrite=False)
    manager.check(name="long", device="cpu", settings={**job.record["settings"], "steps": 900}, overwrite=False)


def test_restart_marks_a_vanished_job_interrupted(jm, tmp_path):
    folder = tmp_path / "runs" / "gone"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"id": "0123456789ab", "method": "fairhuman", "output_name": "gone", "device": "cpu",
              "state": "running", "settings": {}, "lora_name": "fairhuman/gone.safetensors", "pid": dead.pid,
              "created": 1.0}
    (folder / "job.json").write_text(json.dumps(record))
    (folder / "events.jsonl").write_text(json.dumps({"event": "progress", "stage": "train", "step": 4,
                                                     "total": 10, "losses": {"global": 0.5}}) + "\n")
    manager = jm.JobManager(tmp_path / "runs")
    job = manager.job("0123456789ab")
    assert job.state == "interrupted" and "resumable" in job.record["error"] and job.step == 4
    assert json.loads((folder / "job.json").read_text())["state"] == "interrupted"
    manager.check(name="new", device="cpu", settings={}, overwrite=False)  # not busy
    assert manager.job("../gone") is None and manager.job("0123456789AB") is None


def test_job_environment_is_explicit(jm):
    env = jm.job_environment(ROOT)
    assert env["PYTHONPATH"] == str(ROOT) and env["PYTHONUNBUFFERED"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert os.path.isdir(env["PYTHONPATH"])


def test_a_refused_trainer_option_is_the_jobs_error(tmp_path):
    """The trainer refuses a bad option (exit 2, one 'error:' line): the job's final event carries
    that line, so the node and the panel show it."""
    _spec(tmp_path, "bad", 2, rank=0).with_job("0123456789ab", tmp_path / "job").write(tmp_path / "spec.json")
    done = subprocess.run([sys.executable, "-m", "trainers", "job", str(tmp_path / "spec.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "job" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "error" and "--rank 0" in events[-1]["message"]
    assert not (tmp_path / "loras").exists()


@pytest.mark.slow
def test_cancelled_job_queued_again_ends_with_the_same_lora_bit_for_bit(jm, tmp_path, monkeypatch):
    """Through the manager and the job runner: cancel mid-run, queue the same name again, and the
    LoRA equals an uninterrupted run's. One thread: with two, CPU torch reorders a reduction and
    even two uninterrupted runs differ by ~1e-6."""
    from train_helpers import lora_tensors

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job inherits ComfyUI's environment
    manager = jm.JobManager(tmp_path / "runs")
    straight = _submit(manager, tmp_path, "straight", 6)
    assert straight.finished.wait(600) and straight.state == "done", straight.record
    job = _submit(manager, tmp_path, "again", 6)
    while job.step < 2 and not job.finished.is_set():
        time.sleep(0.05)
    manager.cancel(job.id)
    assert job.state == "cancelled"
    again = _submit(manager, tmp_path, "again", 6)
    assert again.finished.wait(600) and again.state == "done", again.record
    a, b = lora_tensors(straight.record["lora_path"]), lora_tensors(again.record["lora_path"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_fair_dpo_job_builds_pairs_then_trains_regional_objectives(jm, tmp_path):
    """What Train HG-DPO LoRA with method fair-dpo hands the manager: prompts → pairs (with each
    kept image's masks) → the fair-dpo trainer, whose LoRA records the three DPO objectives."""
    from core.lora_format import read_lora_metadata

    manager = jm.JobManager(tmp_path / "runs")
    name = "fair"
    spec = _job_spec(tmp_path, name, "fair-dpo", prompts=["a photo of a woman waving", "two friends smiling"],
                     build_pairs={"n": 2, "scorer": "anatomy", "size": 64, "steps": 2, "seed": 0},
                     train={"steps": 2, "resolution": 64, "rank": 4, "lr": 1e-3, "mixed_precision": "no",
                            "checkpoint_every": 0, "seed": 0, "eval_pairs": 0})
    job = manager.submit(spec, name=name, device="cpu", settings=dict(spec.train), overwrite=False)
    assert job.finished.wait(600), job.dir.joinpath("job.log").read_text()[-3000:]
    assert job.state == "done", (job.record, job.dir.joinpath("job.log").read_text()[-3000:])
    meta = {k.removeprefix("fairhuman."): v for k, v in read_lora_metadata(job.record["lora_path"]).items()}
    assert meta["method"] == "fair-dpo" and meta["objectives"] == ["global", "face", "hand"]


@pytest.mark.slow
def test_a_controlnet_job_renders_poses_then_trains_a_controlnet(jm, tmp_path, sample_photos):
    """What Train FairHuman ControlNet hands the manager: a folder of real photos without
    metadata.jsonl (one with the user's own condition in its masks/) → annotate --pose into the
    job folder (the user's folder untouched) → the ControlNet trainer → a diffusers-layout
    ControlNet copied to where ComfyUI lists ControlNets."""
    import shutil

    from PIL import Image
    from safetensors import safe_open

    from core.lora_format import read_lora_metadata

    photos = tmp_path / "my photos"
    (photos / "masks").mkdir(parents=True)
    for path in sample_photos[:2]:
        shutil.copy(path, photos / path.name)
    own = photos / "masks" / f"{sample_photos[1].stem}_condition.png"
    Image.new("RGB", (48, 32), (90, 40, 200)).save(own)  # a depth map of the user's: used as it is
    before = sorted((p.relative_to(photos), p.stat().st_mtime_ns) for p in photos.rglob("*"))

    name = "posed"
    dest = tmp_path / "controlnet" / "fairhuman" / f"{name}.safetensors"
    spec = _job_spec(tmp_path, name, "fairhuman-controlnet", folder="controlnet", dataset=str(photos), train={
        "steps": 2, "resolution": 64, "lr": 1e-3, "mixed_precision": "no", "checkpoint_every": 0, "seed": 0,
        "condition_dropout": 0.0})
    manager = jm.JobManager(tmp_path / "runs")
    job = manager.submit(spec, name=name, device="cpu", settings=dict(spec.train), overwrite=False)
    assert job.finished.wait(900), job.dir.joinpath("job.log").read_text()[-3000:]
    assert job.state == "done", (job.record, job.dir.joinpath("job.log").read_text()[-3000:])

    events = [json.loads(line) for line in (job.dir / "events.jsonl").read_text().splitlines()]
    stages = [(e["name"], e.get("pose")) for e in events if e["event"] == "stage"]
    assert stages == [("annotate", True), ("train", None)]
    rows = {Path(r["image"]).name: r for r in map(json.loads, (job.dir / "dataset" / "metadata.jsonl").open())}
    assert len(rows) == 2  # the user's condition in masks/ is not taken for a photo
    drawn, kept = rows[sample_photos[0].name], rows[sample_photos[1].name]
    assert drawn["pose"]["people"] >= 2 and (job.dir / "dataset" / drawn["condition"]).is_file()
    assert (job.dir / "dataset" / kept["condition"]).resolve() == own.resolve() and "pose" not in kept
    assert sorted((p.relative_to(photos), p.stat().st_mtime_ns) for p in photos.rglob("*")) == before

    assert Path(job.record["lora_path"]) == dest and dest.is_file()
    with safe_open(str(dest), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("controlnet_cond_embedding.") for k in keys)
    assert any(k.startswith("controlnet_down_blocks.") for k in keys)
    meta = {k.removeprefix("fairhuman."): v for k, v in read_lora_metadata(dest).items()}
    assert meta["method"] == "fairhuman-controlnet" and meta["objectives"] == ["global", "face", "hand"]


# ---- the queue -----------------------------------------------------------------------------------
def _events(job) -> list[dict]:
    return [json.loads(line) for line in (job.dir / "events.jsonl").read_text().splitlines()]


def test_a_job_that_could_never_start_is_refused(jm, tmp_path):
    manager = jm.JobManager(tmp_path / "runs", devices=lambda: ["cpu", "cuda:0"])
    with pytest.raises(jm.JobRefused, match=r"device cuda:3 does not exist on this machine \(it has cpu, cuda:0\)"):
        manager.check(name="x", device="cuda:3", settings={}, overwrite=False)
    with pytest.raises(jm.JobRefused, match="cuda:1 does not exist"):
        manager.check(name="x", device="cuda:0", devices="cuda:0,1", settings={}, overwrite=False)
    with pytest.raises(jm.JobRefused, match="a GPU named twice"):
        manager.check(name="x", device="cuda:0", devices="cuda:0,0", settings={}, overwrite=False)
    assert manager.devices_of("cpu", "all") == ["cuda:0"] and manager.devices_of("cpu", "cpu,cpu") == ["cpu", "cpu"]
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.slow
def test_a_job_on_a_busy_device_waits_its_turn_and_a_cancelled_one_leaves_nothing(jm, tmp_path):
    """Three jobs on the CPU: the first runs, the second and third wait (state queued, their
    position and the job each waits for in the summary, nothing in their run folders); the third
    cancelled while queued leaves no file and no record; the second starts when the first ends."""
    seen = []
    manager = jm.JobManager(tmp_path / "runs", notify=lambda summary, event: seen.append((summary, event)))
    first = _submit(manager, tmp_path, "first", 2)
    second = _submit(manager, tmp_path, "second", 2)
    third = _submit(manager, tmp_path, "third", 2)
    assert first.state == "running"
    listed = {j["id"]: j for j in manager.list()}
    assert [listed[j.id]["state"] for j in (second, third)] == ["queued", "queued"]
    assert (listed[second.id]["queue_position"], listed[second.id]["queued_behind"]) == (1, first.id)
    assert (listed[third.id]["queue_position"], listed[third.id]["queued_behind"]) == (2, second.id)
    assert listed[first.id]["queue_position"] is None and listed[first.id]["queued_behind"] is None
    assert not second.dir.exists() and not third.dir.exists()
    assert ("queued", second.id) in [(e.get("state"), s["id"]) for s, e in seen]
    with pytest.raises(jm.JobRefused, match=f"output_name 'second' is already queued as training job {second.id}"):
        manager.check(name="second", device="cpu", settings={}, overwrite=False)

    manager.cancel(third.id)
    assert third.state == "cancelled" and third.finished.is_set()
    assert manager.job(third.id) is None and third.id not in {j["id"] for j in manager.list()}
    assert not third.dir.exists() and not list((tmp_path / "runs" / ".queue").glob(f"{third.id}*"))
    assert second.state == "queued" and second.queue_position == 1

    assert first.finished.wait(600) and first.state == "done", first.record
    assert second.finished.wait(600) and second.state == "done", (second.record, second.dir)
    assert second.record["started"] >= first.record["finished"]
    assert Path(second.record["lora_path"]).is_file()
    assert not list((tmp_path / "runs" / ".queue").iterdir())
    assert not (tmp_path / "loras" / "fairhuman" / "third.safetensors").exists()


MANAGER_THEN_KILLED = """
import sys, time
sys.path[:0] = [{tests!r}, {root!r}]
from test_job_manager import _submit
from train_helpers import import_pack
from pathlib import Path
jm = import_pack("nodes.job_manager")
manager = jm.JobManager(Path({runs!r}))
first = _submit(manager, Path({tmp!r}), "before", {steps})
second = _submit(manager, Path({tmp!r}), "after", 2)
print(first.id, second.id, second.state, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_the_queue_survives_a_restart_of_comfyui(jm, tmp_path):
    """ComfyUI killed (SIGKILL: no clean exit) while one job runs and one waits: the next start
    follows the running job (its own process group outlived ComfyUI) and starts the queued one
    after it, in order, from what the queue folder kept."""
    script = MANAGER_THEN_KILLED.format(tests=str(ROOT / "tests"), root=str(ROOT), runs=str(tmp_path / "runs"),
                                        tmp=str(tmp_path), steps=4)
    comfy = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        first_id, second_id, state = comfy.stdout.readline().split()
    finally:
        comfy.kill()
        comfy.wait()
    assert state == "queued"
    manager = jm.JobManager(tmp_path / "runs")
    first, second = manager.job(first_id), manager.job(second_id)
    assert first is not None and second is not None
    assert first.state == "running" and second.state == "queued" and second.queued_behind == first_id
    assert second.finished.wait(900), second.record
    assert first.state == "done" and second.state == "done", (first.record, second.record)
    assert second.record["started"] >= first.record["finished"]
    assert Path(second.record["lora_path"]).is_file()


# ---- several devices -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_job_on_two_cpu_processes_builds_pairs_and_trains_as_one_job(jm, tmp_path, monkeypatch):
    """devices "cpu,cpu": the nearest testable thing to cuda:0,1 on a machine without GPUs — the job
    runs under torch.distributed.run as two processes (gloo). It is one job: build-pairs splits the
    prompts (per-rank part files, counted together while they grow), the trainer runs
    data-parallel, one LoRA and one final event; a CPU job queued meanwhile waits for it (a job owns
    all its devices)."""
    from safetensors import safe_open

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    manager = jm.JobManager(tmp_path / "runs")
    prompts = [f"a photo of person {i} waving" for i in range(6)]
    spec = _job_spec(tmp_path, "both", "fair-dpo", prompts=prompts, devices="cpu,cpu",
                     build_pairs={"n": 2, "scorer": "anatomy", "size": 64, "steps": 2, "seed": 0},
                     train={"steps": 2, "resolution": 64, "rank": 4, "lr": 1e-3, "mixed_precision": "no",
                            "checkpoint_every": 0, "seed": 0, "eval_pairs": 0, "device": "cpu"})
    job = manager.submit(spec, name="both", device="cpu", settings=dict(spec.train), overwrite=False)
    waiting = _submit(manager, tmp_path, "single", 2)
    assert job.summary()["devices"] == ["cpu", "cpu"] and job.state == "running"
    assert waiting.state == "queued" and waiting.queued_behind == job.id
    assert job.finished.wait(900), job.dir.joinpath("job.log").read_text()[-3000:]
    assert job.state == "done", (job.record, job.dir.joinpath("job.log").read_text()[-4000:])
    events = _events(job)
    assert events[0]["event"] == "start" and events[0]["processes"] == 2
    assert [e["event"] for e in events].count("done") == 1 and (job.dir / "events.rank1.jsonl").is_file()
    counted = [e["step"] for e in events if e["event"] == "progress" and e.get("stage") == "build-pairs"]
    assert counted[-1] == len(prompts) and counted == sorted(counted)
    # pairs.jsonl is written once, at the merge: a count between 0 and all came from the part files
    assert any(0 < step < len(prompts) for step in counted), counted
    pairs = [json.loads(line) for line in (job.dir / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in pairs] == prompts and not list((job.dir / "pairs").glob("*.part-*"))
    assert [e["step"] for e in events if e["event"] == "progress" and e.get("stage") == "train"] == [1, 2]
    with safe_open(job.record["lora_path"], "pt") as handle:
        assert list(handle.keys())
    assert waiting.finished.wait(600) and waiting.state == "done", waiting.record
    assert waiting.record["started"] >= job.record["finished"]


# ---- validation and the best LoRA ----------------------------------------------------------------
@pytest.mark.slow
def test_a_validated_job_keeps_its_latest_validation_and_copies_the_best_lora(jm, tmp_path):
    """validate_every: the summary holds the latest validation event's numbers, and the trainer's
    best LoRA is copied beside the final one (its name in the done event, for the nodes)."""
    manager = jm.JobManager(tmp_path / "runs")
    job = _submit(manager, tmp_path, "judged", 2, validate_every=1, validation_prompts=["a person waving"],
                  validation_seeds=1, sample_steps=1)
    assert job.finished.wait(600), job.dir.joinpath("job.log").read_text()[-3000:]
    assert job.state == "done", (job.record, job.dir.joinpath("job.log").read_text()[-3000:])
    validation = job.summary()["validation"]
    assert set(validation) == {"step", "metric", "score", "best_step", "best_score"} and validation["step"] == 2
    best = tmp_path / "loras" / "fairhuman" / "judged_best.safetensors"
    done = _events(job)[-1]
    assert done["event"] == "done" and done["best_lora"] == str(best) and best.is_file()
    assert done["best_lora_name"] == "fairhuman/judged_best.safetensors"
    assert job.summary()["best_lora_name"] == done["best_lora_name"]
    run_best = job.dir / "train" / "judged_best.safetensors"
    assert best.read_bytes() == run_best.read_bytes()


def _weights_file(path: Path, value: float) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((2,), value)}, str(path))
    return path


def test_finishing_copies_the_best_lora_under_the_same_rules_as_the_final_one(tmp_path):
    from trainers.node_job import StageFailed, finish_weights

    spec = _job_spec(tmp_path, "hands", "fairhuman")
    run = tmp_path / "run"
    trained = {"file": _weights_file(run / "hands.safetensors", 1.0)}
    dest, best = tmp_path / "loras" / "fairhuman" / "hands.safetensors", tmp_path / "loras" / "fairhuman" / "hands_best.safetensors"
    # no validation: no best, and the final LoRA's name stands in for it
    assert finish_weights(spec, trained) == {"lora": str(dest), "best_lora": None,
                                             "best_lora_name": "fairhuman/hands.safetensors"}
    assert not best.exists()
    # with a best: refused while either file exists, nothing copied
    _weights_file(run / "hands_best.safetensors", 2.0)
    dest.unlink()
    _weights_file(best, 9.0)
    with pytest.raises(StageFailed, match="hands_best.safetensors already exists"):
        finish_weights(spec, trained)
    assert not dest.exists()
    replace = dataclasses.replace(spec, overwrite=True)
    assert finish_weights(replace, trained)["best_lora_name"] == "fairhuman/hands_best.safetensors"
    assert best.read_bytes() == (run / "hands_best.safetensors").read_bytes()
    # overwrite, and this run has no best: the earlier run's best goes
    (run / "hands_best.safetensors").unlink()
    assert finish_weights(replace, trained)["best_lora"] is None and not best.exists() and dest.is_file()


def test_a_jobs_summary_keeps_the_latest_validation(jm, tmp_path):
    job = jm.Job({"id": "0123456789ab", "method": "fairhuman", "state": "running"}, tmp_path)
    for step, score in ((2, 0.25), (4, 0.5)):
        job.apply({"event": "validation", "step": step, "metric": "face-hand", "score": score, "scores": {},
                   "best_step": 4 if score == 0.5 else 2, "best_score": max(score, 0.25), "best_path": "x"})
    assert job.summary()["validation"] == {"step": 4, "metric": "face-hand", "score": 0.5, "best_step": 4,
                                           "best_score": 0.5}
