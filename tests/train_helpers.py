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


def assert_mpd_run_lowers_all_three_losses(args, folder: Path, label: str = "") -> list[dict]:
    """``train ARGS`` for 30 MPD steps of batch 4 into ``folder``: it ends well, every objective's
    loss falls (assert_all_losses_fall) and the last step's MPD weights are positive."""
    result = train_cli(*args, "--output", folder, "--steps", 30, "--batch-size", 4, "--weighting", "mpd",
                       "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    progress = assert_all_losses_fall(folder, 30, label)
    assert all(w > 0 for w in progress[-1]["weights"])
    return progress


def assert_rendering_refused(args, folder: Path, arch: str, flag: str) -> None:
    """``train ARGS FLAG 1`` (``--sample-every`` or ``--validate-every``) on a family that cannot
    render yet fails before its first step, saying so, and leaves no LoRA or checkpoint."""
    result = train_cli(*args, "--output", folder, "--steps", 2, flag, 1)
    assert result.returncode == 1
    assert f"cannot render {arch} images yet" in result.stdout + result.stderr
    assert not list(folder.glob("*.safetensors")) and not (folder / "checkpoints").exists()


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


def one_pixel_face_dataset(folder: Path, pixel_yx) -> Path:
    """One 80×64 image (wider than the 64² crop, so random crops move it; never resized) whose
    face mask is the single pixel ``pixel_yx``."""
    folder.mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / "img.png")
    face = np.zeros((64, 80), np.uint8)
    face[pixel_yx] = 255
    Image.fromarray(face).save(folder / "masks" / "img_face.png")
    Image.fromarray(np.zeros_like(face)).save(folder / "masks" / "img_hand.png")
    row = {"image": "img.png", "text": "a photo of a person", "width": 80, "height": 64,
           "mask_face": "masks/img_face.png", "mask_hand": "masks/img_hand.png", "status": "ok"}
    (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    return folder


def assert_one_pixel_face_owns_its_patch(base: str, folder: Path, tokens_of) -> None:
    """On a 2×2-patch transformer (``base``, trained at 64 px: 4×4 patches of 16×16 pixels), the
    face loss's gradient reaches the denoiser's output only at the patch holding a one-pixel face,
    and at every feature of that patch, through every crop and flip the data pipeline draws.
    ``tokens_of``: the denoiser's output (its first element) as (1, 16 patches row-major, features)."""
    import torch

    from core.tiny_models import build_tiny_pipeline
    from trainers.config import TrainConfig
    from trainers.data import collate
    from trainers.methods.fairhuman import FairHuman
    from trainers.model import TrainableModel

    y, x = 21, 37  # inside every 64-wide crop of the 80-wide image (left offset 0..16)
    cfg = TrainConfig(data=str(one_pixel_face_dataset(folder / "data", (y, x))), resolution=64, bucketing=False,
                      random_crop=True, flip_p=0.5, batch_size=1, rank=4)
    model = TrainableModel(build_tiny_pipeline(base), rank=4)
    method = FairHuman(cfg, model)
    outputs = []
    model.denoiser.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    seen = set()
    for epoch in range(8):
        batch = collate([method.dataset.item(0, epoch)])
        top, left = (int(v) for v in batch["time_ids"][0, 2:4])
        flipped = batch["view"][0].endswith("flip")
        col = x - left
        col = 63 - col if flipped else col
        patch = ((y - top) // 16) * 4 + col // 16
        outputs.clear()
        losses = method.losses(batch, torch.Generator().manual_seed(epoch)).losses
        (grad,) = torch.autograd.grad(losses[1], outputs[0])
        owned = tokens_of(grad)[0].ne(0)
        assert owned.any(dim=1).nonzero().flatten().tolist() == [patch], (epoch, top, left, flipped)
        assert owned[patch].all(), "every latent cell of the face's patch counts"
        seen.add((left, flipped))
    assert {f for _, f in seen} == {True, False} and len({left for left, _ in seen}) > 1


def short_lora_run(base: str, dataset: Path, folder: Path) -> dict:
    """run_job's result (the LoRA file and the trained model) of a 3-step FairHuman LoRA of rank 4,
    alpha 2, on ``base`` at 64 px, run in this process."""
    from core.fileio import EventLog
    from trainers.config import TrainConfig
    from trainers.train_job import run_job

    cfg = TrainConfig(method="fairhuman", base=base, data=str(dataset), output=str(folder), steps=3,
                      resolution=64, rank=4, alpha=2.0, lr=1e-2, batch_size=2, checkpoint_every=0)
    return run_job(cfg, folder, EventLog(folder / "events.jsonl", echo=False), resume=False,
                   stop_requested=lambda: False, keep_model=True)


def lora_module_keys(tensors: dict) -> set:
    """The kohya module names of a LoRA's tensors (``<name>.lora_down.weight`` ... -> ``<name>``)."""
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}


def assert_lora_file_keys(path: Path, expected: set, arch: str, kohya_version: str) -> None:
    """The LoRA file of a short_lora_run holds a lora_down, a lora_up and an alpha of 2 for exactly
    the kohya module names ``expected``, and records its base as ``arch`` (this pack's metadata)
    and ``kohya_version`` (kohya's ss_base_model_version)."""
    from core.lora_format import read_lora_metadata

    tensors = lora_tensors(path)
    names = lora_module_keys(tensors)
    assert names == expected
    assert len(tensors) == 3 * len(expected)  # lora_down, lora_up and alpha of each
    assert all(float(tensors[f"{n}.alpha"]) == 2.0 for n in names)
    meta = read_lora_metadata(path)
    assert meta["fairhuman.base_arch"] == arch and meta["ss_base_model_version"] == kohya_version


def assert_lora_file_reproduces_training(result: dict, base: str, load) -> None:
    """A fresh tiny ``base`` pipeline given the LoRA file by ``load(pipe, path)`` predicts what the
    trained model predicts (latents 16×8×8, σ 0.6), and the base model without it does not."""
    import torch

    from core.families import family_of
    from core.tiny_models import build_tiny_pipeline

    trained = result["model"]
    trained.train(False)
    fresh = build_tiny_pipeline(base)
    load(fresh, result["lora"])
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    cond = trained.encode_prompts(["a photo of hands"])
    with torch.no_grad():
        expected = trained.predict(noisy, sigma, cond)
        got = family_of(fresh).predict(noisy, sigma, cond, None, None, None)
        base_out = family_of(build_tiny_pipeline(base)).predict(noisy, sigma, cond, None, None, None)
    assert (got - expected).abs().max() <= 1e-4
    assert (base_out - expected).abs().max() > 1e-3  # the LoRA really changes the output
