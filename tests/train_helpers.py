"""Small fixed datasets and CLI runners for the trainer tests."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
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


def make_pairs_folder(folder: Path, prompts: int = 2) -> Path:
    """A build-pairs output of random 64-px winner/loser images (no generation: fast)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for k in range(prompts):
        names = []
        for side in ("w", "l"):
            name = f"images/{k}_{side}.png"
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / name)
            names.append(name)
        rows.append({"prompt": f"a photo of a person {k}", "status": "ok", "winner": names[0], "loser": names[1],
                     "winner_score": 1.0, "loser_score": 0.0, "images": names, "scores": [1.0, 0.0]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def offline_env() -> dict:
    """No hub, and any attempt at the network fails fast."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HTTPS_PROXY="http://127.0.0.1:9",
                HTTP_PROXY="http://127.0.0.1:9", PYTHONUNBUFFERED="1")


def train_cli(*args, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainers", "train", *map(str, args)], cwd=ROOT,
                          env=offline_env(), capture_output=True, text=True, timeout=900, **popen)


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
