"""Small fixed datasets and CLI runners for the trainer tests."""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def import_pack(module: str = ""):
    """The pack imported as a package, as ComfyUI does (its nodes use relative imports), or one
    of its modules (``nodes.job_paths``)."""
    name = "fairhuman_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.{module}") if module else sys.modules[name]


def make_region_dataset(folder: Path, count: int = 4, size: int = 128, seed: int = 0) -> Path:
    """Images with a 'face' disc and a small 'hand' square, their masks and metadata.jsonl in
    the annotate format; image 3 has no hand (an empty hand mask must be handled)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    rows = []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        image = (rng.random((size, size, 3)) * 60 + 90).astype(np.uint8)
        cx, cy, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [size // 8]
        face = ((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r
        image[face] = (230, 180, 150)
        hand = np.zeros_like(face)
        if i != 3:
            hx, hy = rng.integers(4, size - 20, 2).tolist()
            hand[hy: hy + 12, hx: hx + 10] = True
            image[hand] = (200, 150, 120)
        name = f"img{i}.png"
        Image.fromarray(image).save(folder / name)
        Image.fromarray(face.astype(np.uint8) * 255).save(folder / "masks" / f"img{i}_face.png")
        Image.fromarray(hand.astype(np.uint8) * 255).save(folder / "masks" / f"img{i}_hand.png")
        rows.append({
            "image": name, "text": "a photo of a person waving hands", "width": size, "height": size,
            "status": "ok", "reason": None,
            "faces": [{"box": [cx - r, cy - r, cx + r, cy + r], "score": 1.0}], "hands": [],
            "mask_face": f"masks/img{i}_face.png", "mask_hand": f"masks/img{i}_hand.png",
        })
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def make_pairs_folder(folder: Path, pairs: int = 2, size: int = 64, seed: int = 0) -> Path:
    """A build-pairs output of random winner/loser images (no generation: fast), with a face
    (top-left block) and a small hand mask per image as build-pairs stores them; pair 1's loser
    has no hand."""
    from trainers.annotate import write_mask

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for k in range(pairs):
        names, masks = [], {}
        for side in ("w", "l"):
            name = f"images/{k}_{side}.png"
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / name)
            face, hand = np.zeros((size, size)), np.zeros((size, size))
            face[: size // 2, : size // 2] = 1
            if not (k == 1 and side == "l"):
                hand[size - 12: size - 2, 10 + 20 * k: 20 + 20 * k] = 1
            entry = {"faces": [{"box": [0, 0, size // 2, size // 2], "score": 1.0}],
                     "hands": [{"box": [0, 0, 1, 1], "score": 1.0}] if hand.any() else []}
            for region, mask in (("face", face), ("hand", hand)):
                path = f"masks/{k}_{side}_{region}.png"
                write_mask(folder / path, mask)
                entry[f"mask_{region}"] = path
            names.append(name)
            masks[name] = entry
        rows.append({"prompt": f"a person waving {k}", "status": "ok", "winner": names[0], "loser": names[1],
                     "winner_score": 1.0, "loser_score": 0.0, "images": names, "scores": [1.0, 0.0],
                     "masks": masks})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "PYTHONUNBUFFERED": "1"}


def offline_env() -> dict:
    """No hub, and any attempt at the network fails fast."""
    return dict(os.environ, **OFFLINE)


@contextlib.contextmanager
def _as_its_own_process(env: dict):
    """What ``python -m trainers`` would see in a process of its own, for one call in this one:
    the pack root as working directory, ``env`` added to the environment (OMP_NUM_THREADS as the
    thread count), every internet connection refused as the dead proxy of offline_env() refuses
    it, and the SIGINT/SIGTERM handlers the trainer installs undone afterwards."""
    import torch

    saved_env, saved_cwd, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise ConnectionRefusedError(f"network access refused in the tests: {address}")
        return connect(self, address, *args)

    def refuse_ex(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            return errno.ECONNREFUSED
        return connect_ex(self, address, *args)

    os.environ.update(env)
    os.chdir(ROOT)
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    socket.socket.connect, socket.socket.connect_ex = refuse, refuse_ex
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
        torch.set_num_threads(saved_threads)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run_trainers(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m trainers ARGS`` run in this process: its exit code and what it printed, as a
    process of its own would give them (see _as_its_own_process). A process costs seconds of
    imports per call; tests whose point is the process itself (killed, a fresh interpreter) use
    ``trainers_process``."""
    from trainers.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with _as_its_own_process({**OFFLINE, **(env or {})}), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's usage errors, sys.exit("message")
            code = exit_.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except Exception:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess([sys.executable, "-m", "trainers", *argv], code or 0, out.getvalue(),
                                       err.getvalue())


def trainers_process(*args, **popen) -> subprocess.Popen:
    """``python -m trainers ARGS`` started as its own process (output discarded unless ``popen``
    says otherwise)."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    return subprocess.Popen([sys.executable, "-m", "trainers", *map(str, args)], cwd=ROOT, env=offline_env(), **popen)


def train_cli(*args) -> subprocess.CompletedProcess:
    """``python -m trainers train ARGS``, in this process (run_trainers)."""
    return run_trainers("train", *args)


def train_in_own_process(*args) -> subprocess.CompletedProcess:
    """``python -m trainers train ARGS`` in a process of its own, for the full-size models: their
    memory (over 13 GB at its peak for a ControlNet) goes back when the run ends."""
    return subprocess.run([sys.executable, "-m", "trainers", "train", *map(str, args)], cwd=ROOT,
                          env=offline_env(), capture_output=True, text=True, timeout=900)


def kill_at_checkpoint(args, output: Path, step: int) -> None:
    """Start ``train ARGS --output OUTPUT`` as its own process and SIGKILL it once it has written
    its step-``step`` checkpoint: before the end, so no LoRA file may exist yet."""
    from core.fileio import read_events

    proc = trainers_process("train", *args, "--output", output)
    deadline = time.monotonic() + 1800  # a guard against a hung run only: a loaded machine is slow
    while not any(e["event"] == "checkpoint" and e["step"] == step for e in read_events(output / "events.jsonl")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, f"no step-{step} checkpoint after 1800 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(output.glob("*.safetensors")), "killed before the end: no LoRA may exist yet"


def assert_killed_run_resumes_exactly(args, folder: Path, kill_at: int, straight_args=()) -> Path:
    """The kill-then-resume scenario: ``train ARGS`` run straight through (with ``straight_args``
    added), and run again killed at its step-``kill_at`` checkpoint (kill_at_checkpoint), then
    continued with --resume from that checkpoint; the two LoRA files must be bitwise equal (CPU
    fp32, every draw seeded by step). Returns the straight run's folder."""
    import torch

    from core.fileio import read_events

    straight, killed = folder / "straight", folder / "killed"
    done = train_cli(*args, *straight_args, "--output", straight)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    kill_at_checkpoint(args, killed, kill_at)
    resumed = train_cli(*args, "--output", killed, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [e["step"] for e in read_events(killed / "events.jsonl") if e["event"] == "resume"] == [kill_at]
    (lora,) = straight.glob("*.safetensors")
    a, b = lora_tensors(lora), lora_tensors(killed / lora.name)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    return straight


def lora_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_all_losses_fall(run_dir: Path, steps: int, label: str = "") -> list[dict]:
    """The run finished ``steps`` steps and each objective's mean loss over the last 10 is below
    that over the first 10; returns its progress events."""
    from core.fileio import read_events

    events = read_events(Path(run_dir) / "events.jsonl")
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) == steps and events[-1]["event"] == "done"
    for name in ("global", "face", "hand"):
        values = [e["losses"][name] for e in progress]
        first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
        assert last < first, f"{label}{name}: first-10 mean {first:.4f}, last-10 mean {last:.4f}"
    return progress
