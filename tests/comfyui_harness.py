"""Run a real ComfyUI server with this pack installed, for the `comfyui`-marked tests.

The ComfyUI source trees tested (docs/testing.md): ``COMFYUI_PATHS`` (tree folders separated by
``:``, each with its interpreter at ``<tree>/../venv/bin/python``); else ``COMFYUI_PATH`` (one
tree; its interpreter ``COMFYUI_PYTHON`` or ``<tree>/../venv/bin/python``); else every one of
``DEFAULT_TREES`` that exists (where docs/testing.md's recipe puts 0.3.64, 0.8.0 and 0.33.0).
The server gets a private --base-directory so the tree itself is never modified: the pack is
linked into its custom_nodes under a hyphenated folder name, as users install it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_FOLDER = "fairhuman-hgdpo"  # hyphenated, as git clones of custom node packs usually are
DEFAULT_TREES = [Path.home() / folder / "ComfyUI" for folder in ("ComfyUI-test", "ComfyUI-080", "ComfyUI-033")]
ALL_TREES_ENV = "COMFYUI_ALL_TREES"  # 1: the heavy tests on every tree, not only the newest


def _configured() -> tuple[list[Path], bool]:
    """(the trees asked for, whether they were named explicitly)."""
    if os.environ.get("COMFYUI_PATHS", "").strip():
        return [Path(p).expanduser() for p in os.environ["COMFYUI_PATHS"].split(":") if p.strip()], True
    if os.environ.get("COMFYUI_PATH", "").strip():
        return [Path(os.environ["COMFYUI_PATH"]).expanduser()], True
    return DEFAULT_TREES, False


def comfyui_trees() -> list[Path]:
    """The ComfyUI trees to test on, oldest first; only those with main.py and an interpreter."""
    trees = [t for t in _configured()[0] if (t / "main.py").is_file() and comfyui_python(t) is not None]
    return sorted(trees, key=tree_version)


def comfyui_tree() -> Path | None:
    """One tree (the newest), for what any tree serves: CLIP's vocabulary, ComfyUI's parsers."""
    trees = comfyui_trees()
    return trees[-1] if trees else None


def comfyui_python(tree: Path) -> Path | None:
    explicit = os.environ.get("COMFYUI_PYTHON") if not os.environ.get("COMFYUI_PATHS", "").strip() else None
    path = Path(explicit) if explicit else tree.parent / "venv" / "bin" / "python"
    return path if path.exists() else None


def tree_version(tree: Path) -> tuple[int, ...]:
    """ComfyUI's version of a tree (comfyui_version.py), (0,) when it does not say."""
    try:
        found = re.search(r'__version__\s*=\s*"([\d.]+)"', (tree / "comfyui_version.py").read_text())
    except OSError:
        found = None
    return tuple(int(p) for p in found.group(1).split(".")) if found else (0,)


def version_label(tree: Path) -> str:
    return ".".join(map(str, tree_version(tree)))


def heavy_on_all_trees() -> bool:
    return os.environ.get(ALL_TREES_ENV, "") == "1"


def missing_reason() -> str | None:
    """Why the ComfyUI tests cannot run here, or None when they can."""
    if comfyui_trees():
        return None
    asked, explicit = _configured()
    where = ", ".join(map(str, asked))
    return (f"no ComfyUI tree with its venv (<tree>/../venv) at {where}: "
            + ("check COMFYUI_PATHS / COMFYUI_PATH" if explicit else "set COMFYUI_PATHS, or see docs/testing.md"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """A ComfyUI process on a loopback port, with helpers for its HTTP API."""

    def __init__(self, base_dir: Path, models: dict[str, Path] | None = None, tree: Path | None = None):
        tree = tree or comfyui_tree()
        python = comfyui_python(tree) if tree else None
        if tree is None or python is None:
            raise RuntimeError(missing_reason())
        self.version = tree_version(tree)
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
        # One CPU thread, inherited by the training jobs it starts: with two, CPU torch's backward
        # (SDPA's flash-attention kernel above all) sums in a varying order, so two identical runs
        # differ, and AdamW turns that into up to an lr-sized step; single-threaded they are
        # equal bit for bit, which the resume tests assert.
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
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

    def cancel_jobs(self) -> None:
        """Cancel the pack's queued and running training jobs: their trainers run in sessions of
        their own and would outlive the server (and a failed test) otherwise."""
        try:
            jobs = self.get("/fairhuman/jobs")["jobs"]
        except (OSError, ValueError, KeyError):
            return  # the server is gone, or has no job routes
        for job in jobs:
            if job.get("state") in ("queued", "running"):
                try:
                    self.post(f"/fairhuman/jobs/{job['id']}/cancel", {})
                except (OSError, RuntimeError):
                    pass  # settled meanwhile

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.cancel_jobs()
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
                body = resp.read()
                return json.loads(body) if body.strip() else {}  # /interrupt answers with no body
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"POST {path} -> {err.code}: {err.read().decode(errors='replace')}") from err

    def object_info(self) -> dict:
        return self.get("/object_info")

    def run(self, prompt: dict, timeout: float = 600.0, client_id: str | None = None) -> dict:
        """Queue an API-format graph and wait for it; returns its history entry or raises with
        ComfyUI's own error message and the tail of the log. ``client_id``: the websocket client
        that gets the prompt's progress messages (see ``WebSocketListener``)."""
        return self.wait(self.queue(prompt, client_id), timeout)

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """Queue an API-format graph; returns its prompt id at once."""
        payload = {"prompt": prompt, **({"client_id": client_id} if client_id else {})}
        return self.post("/prompt", payload)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The history entry of a queued prompt once it has finished (see ``run``)."""
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


class WebSocketListener:
    """The server's websocket (``/ws``) as a browser tab sees it: every JSON message it sends,
    collected by a thread. Queue prompts with ``client_id=listener.client_id`` to receive their
    progress messages (ComfyUI sends those to the prompt's client only)."""

    def __init__(self, server: ComfyServer):
        import threading
        import uuid

        import websocket  # websocket-client, in requirements-dev.txt

        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self._ws = websocket.create_connection(
            f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}", timeout=30)
        self._ws.settimeout(1.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import websocket

        while not self._stop.is_set():
            try:
                data = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError):
                return
            if isinstance(data, str) and data.strip():  # binary frames are preview images
                self.messages.append(json.loads(data))

    def of_type(self, kind: str) -> list[dict]:
        return [m["data"] for m in list(self.messages) if m.get("type") == kind]

    def wait_for(self, kind: str, predicate=lambda data: True, timeout: float = 300.0) -> dict:
        """The first message of ``kind`` whose data satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for data in self.of_type(kind):
                if predicate(data):
                    return data
            time.sleep(0.1)
        raise TimeoutError(f"no {kind!r} message matching within {timeout} s (got {len(self.messages)} messages)")

    def close(self) -> None:
        self._stop.set()
        self._ws.close()
        self._thread.join(5)


FRONTEND_ONLY_NODES = ("Note", "MarkdownNote")  # drawn by the browser; not in /object_info


def declared_inputs(info_node: dict) -> dict:
    spec = info_node["input"]
    return {**spec.get("required", {}), **spec.get("optional", {})}


def is_widget_input(spec) -> bool:
    """Whether an input of /object_info is a widget (has a value in a saved node's widgets_values):
    a combo or a primitive not declared socket-only (forceInput)."""
    options = spec[1] if len(spec) > 1 else {}
    return (isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) and not options.get(
        "forceInput")


def workflow_to_api(workflow: dict, object_info: dict) -> dict:
    """The API form of a UI-format workflow, as the browser builds it for /prompt: each node's
    widget values in its declared input order (skipping the UI's extra control/upload widgets),
    links as [source id, output slot]; notes left out."""
    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY_NODES}
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node_id, node in nodes.items():
        inputs, values = {}, list(node.get("widgets_values", []))
        linked = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, *_ = links[slot["link"]]
                linked[slot["name"]] = [str(src), src_slot]
        for name, spec in declared_inputs(object_info[node["type"]]).items():
            if name in linked:
                inputs[name] = linked[name]
                continue
            options = spec[1] if len(spec) > 1 else {}
            is_widget = is_widget_input(spec)
            if not values or not is_widget:  # an unlinked socket (an optional MODEL) has no widget value
                continue
            inputs[name] = values.pop(0)
            if options.get("control_after_generate"):
                values.pop(0)
            if options.get("image_upload") and values:
                values.pop(0)
        api[str(node_id)] = {"class_type": node["type"], "inputs": inputs}
    return api
