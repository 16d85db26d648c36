"""Run a real ComfyUI server with this pack installed, for the `comfyui`-marked tests.

The ComfyUI source tree is found through COMFYUI_PATH, else at ~/ComfyUI-test/ComfyUI (where the
README's recipe puts it); its interpreter through COMFYUI_PYTHON, else <tree>/../venv/bin/python.
The server gets a private --base-directory so the tree itself is never modified: the pack is
linked into its custom_nodes under a hyphenated folder name, as users install it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_FOLDER = "fairhuman-hgdpo"  # hyphenated, as git clones of custom node packs usually are
DEFAULT_TREE = Path.home() / "ComfyUI-test" / "ComfyUI"


def comfyui_tree() -> Path | None:
    path = Path(os.environ.get("COMFYUI_PATH", DEFAULT_TREE)).expanduser()
    return path if (path / "main.py").is_file() else None


def comfyui_python(tree: Path) -> Path | None:
    explicit = os.environ.get("COMFYUI_PYTHON")
    path = Path(explicit) if explicit else tree.parent / "venv" / "bin" / "python"
    return path if path.exists() else None


def missing_reason() -> str | None:
    """Why the ComfyUI tests cannot run here, or None when they can."""
    tree = comfyui_tree()
    if tree is None:
        return f"no ComfyUI tree: set COMFYUI_PATH (looked at {os.environ.get('COMFYUI_PATH', DEFAULT_TREE)})"
    if comfyui_python(tree) is None:
        return f"no Python for ComfyUI: set COMFYUI_PYTHON or create {tree.parent / 'venv'}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """A ComfyUI process on a loopback port, with helpers for its HTTP API."""

    def __init__(self, base_dir: Path, models: dict[str, Path] | None = None):
        tree = comfyui_tree()
        python = comfyui_python(tree) if tree else None
        if tree is None or python is None:
            raise RuntimeError(missing_reason())
        self.tree, self.python, self.base_dir = tree, python, Path(base_dir)
        custom = self.base_dir / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        link = custom / PACK_FOLDER
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        for kind, folder in (models or {}).items():
            target = self.base_dir / "models" / kind
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(folder, target_is_directory=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "comfyui.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [str(self.python), str(self.tree / "main.py"), "--cpu", "--listen", "127.0.0.1",
             "--port", str(self.port), "--disable-auto-launch", "--base-directory", str(self.base_dir)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.tree, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"POST {path} -> {err.code}: {err.read().decode(errors='replace')}") from err

    def object_info(self) -> dict:
        return self.get("/object_info")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue an API-format graph and wait for it; returns its history entry or raises with
        ComfyUI's own error message and the tail of the log."""
        prompt_id = self.post("/prompt", {"prompt": prompt})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error" or not status.get("completed", True):
                    raise RuntimeError(f"prompt failed: {json.dumps(status)[:4000]}\n{self.log()[-4000:]}")
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not done in {timeout} s\n{self.log()[-4000:]}")

    def add_model(self, kind: str, path: Path, name: str | None = None) -> str:
        """Make a model file visible in ``models/<kind>`` (a link; ComfyUI rescans); returns its name."""
        folder = self.base_dir / "models" / kind
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / (name or Path(path).name)
        if not target.exists():
            target.symlink_to(Path(path).resolve())
        return target.name

    def latest_latent(self, prefix: str):
        """The newest latent a SaveLatent node wrote with ``filename_prefix=prefix``."""
        from safetensors.torch import load_file

        files = sorted((self.base_dir / "output").glob(f"{prefix}_*.latent"))
        if not files:
            raise FileNotFoundError(f"no saved latent {prefix}_*.latent")
        return load_file(str(files[-1]))["latent_tensor"]

    def outputs(self, entry: dict, node_id: str, kind: str = "images") -> list[Path]:
        """Files a node of a finished prompt wrote, as paths on disk."""
        found = []
        for item in entry["outputs"].get(node_id, {}).get(kind, []):
            folder = self.base_dir / item.get("type", "output")
            found.append(folder / item.get("subfolder", "") / item["filename"])
        return found


def txt2img_nodes(ckpt: str, prompt: str = "a photo of hands", size: int = 64, batch: int = 1) -> dict:
    """API nodes "1" checkpoint, "3"/"4" positive/negative, "5" empty latent."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
    }


def sampler_inputs(seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal") -> dict:
    """KSampler's inputs wired to ``txt2img_nodes``."""
    return {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
            "denoise": 1.0, "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0]}


def save_latent(source: str, prefix: str) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": [source, 0], "filename_prefix": prefix}}
