"""Installing the pack as a ComfyUI user does: requirements, registry metadata, no mediapipe.

The slow test builds a fresh venv like ComfyUI's (numpy 2 and torch first), installs
requirements.txt with pip from the package index, sets the model files up with
`python -m trainers models` and detects faces; it skips with pip's reason when no index answers.
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import comfyui_harness

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
OPENCV_DISTRIBUTIONS = {"opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless"}


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _name(requirement: str) -> str:
    for stop in "<>=!~;[ ":
        requirement = requirement.split(stop)[0]
    return requirement.lower()


def test_requirements_are_pyproject_dependencies_with_one_opencv():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == _requirements()
    names = [_name(r) for r in _requirements()]
    assert "torch" not in names  # ComfyUI brings its own build
    assert [n for n in names if n in OPENCV_DISTRIBUTIONS] == ["opencv-contrib-python"]
    numpy = next(r for r in _requirements() if _name(r) == "numpy")
    assert numpy == "numpy"  # never pinned: nothing the pack installs moves ComfyUI's numpy
    assert any(r.startswith("mediapipe>=0.10.3") for r in _requirements())
    # the OpenCV named is the one mediapipe itself depends on (so it adds no second cv2)
    requires = importlib.metadata.requires("mediapipe") or []
    version = importlib.metadata.version("mediapipe")
    if tuple(int(p) for p in version.split(".")[:3]) >= (0, 10, 32):
        assert any(_name(r) == "opencv-contrib-python" for r in requires), requires


BLOCK_MEDIAPIPE = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mediapipe" or name.startswith("mediapipe."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
"""

IMPORT_PACK = """
import importlib.util, sys
from pathlib import Path

root = Path(sys.argv[1])
# the pack as ComfyUI imports it: a package named after its folder, from its __init__.py
spec = importlib.util.spec_from_file_location("fairhuman_hgdpo", root / "__init__.py",
                                              submodule_search_locations=[str(root)])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
# the nodes need ComfyUI (comfy_api); what imports without it must import without mediapipe too
import importlib
for module in ("job_paths", "job_manager", "train_inputs", "train_lora", "graph_data", "routes"):
    importlib.import_module(f"fairhuman_hgdpo.nodes.{module}")
print(" ".join(sorted(["comfy_entrypoint"] if callable(pack.comfy_entrypoint) else [])))
import numpy as np
from fairhuman_hgdpo.core.masks import detect
try:
    detect(np.zeros((8, 8, 3), np.uint8))
except ImportError as err:
    print(type(err).__name__, err)
"""


def test_the_pack_imports_in_a_python_without_mediapipe(tmp_path):
    done = subprocess.run([sys.executable, "-c", BLOCK_MEDIAPIPE + IMPORT_PACK, str(ROOT)], check=False,
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr
    entry, error = done.stdout.strip().splitlines()
    assert entry == "comfy_entrypoint"  # the nodes themselves: tests/test_comfyui_smoke.py, in ComfyUI
    # the masks engine says what to install, with this interpreter and this pack's requirements
    assert error.startswith("MediapipeMissing mediapipe is not installed"), error
    assert f"{sys.executable} -m pip install -r {ROOT / 'requirements.txt'}" in error, error
    assert "-m trainers models" in error

    # annotate (also a training node's first stage) stops at once with that message
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"not read")
    annotate = BLOCK_MEDIAPIPE + "from trainers.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", annotate, "annotate", str(tmp_path / "photos")], check=False,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: mediapipe is not installed" in done.stderr and "pip install -r" in done.stderr, done.stderr
    assert not (tmp_path / "photos" / "metadata.jsonl").exists()


@pytest.mark.comfyui
def test_comfyui_reads_the_registry_metadata():
    """ComfyUI's own pyproject parser (comfy_config, what the registry and Manager use) on the pack."""
    tree = comfyui_harness.comfyui_tree()
    python = comfyui_harness.comfyui_python(tree)
    if not (tree / "comfy_config").is_dir():
        pytest.skip(f"{tree} has no comfy_config (ComfyUI older than 0.3.4x)")
    code = ("import json, sys; from comfy_config import config_parser as p; "
            "c = p.extract_node_configuration(sys.argv[1]); print(c.model_dump_json())")
    done = subprocess.run([str(python), "-c", code, str(ROOT)], cwd=tree, check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    project, comfy = config["project"], config["tool_comfy"]
    assert project["name"] == "fairhuman-hgdpo" and project["version"].count(".") == 2
    assert project["urls"]["repository"].startswith("https://github.com/")
    assert project["dependencies"] == _requirements()
    assert project["requires_python"] == ">=3.10" and project["supported_os"] == ["OS Independent"]
    assert project["supported_comfyui_version"] == ">=0.3.64"
    assert comfy["publisher_id"] and comfy["display_name"]
    assert project["license"]["file"] == "LICENSE" and (ROOT / "LICENSE").is_file()


def _run(*command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], check=False, capture_output=True, text=True, **kwargs)


CV2_OWNERS = ("import importlib.metadata as md; print(' '.join(sorted({d.metadata['Name'] for d in md.distributions() "
              "for f in (d.files or []) if f.parts and f.parts[0] == 'cv2'})))")


@pytest.mark.slow
@pytest.mark.heavy
def test_fresh_install_keeps_numpy_adds_one_opencv_and_detects(tmp_path, sample_photos):
    probe = _run(sys.executable, "-m", "pip", "index", "versions", "mediapipe", timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"pip reaches no package index here: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    venv = tmp_path / "venv"
    py = venv / "bin" / "python"
    # --no-compile: byte-compiling torch's and the requirements' files is most of an install's time
    # and nothing here depends on it (Python compiles what it imports)
    quiet = ("--quiet", "--disable-pip-version-check", "--no-compile")
    started = time.monotonic()
    try:
        assert _run(sys.executable, "-m", "venv", venv, timeout=300).returncode == 0
        # as ComfyUI's Python is before the pack arrives: torch (this machine's build) and numpy 2
        torch = importlib.metadata.version("torch")
        done = _run(py, "-m", "pip", "install", *quiet, f"torch=={torch}", "numpy>=2", timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        before = _run(py, "-c", "import numpy; print(numpy.__version__)", timeout=120).stdout.strip()
        assert before.startswith("2.")

        done = _run(py, "-m", "pip", "install", *quiet, "-r", ROOT / "requirements.txt", timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        after = _run(py, "-c", "import numpy, mediapipe, cv2; print(numpy.__version__, mediapipe.__version__)",
                     timeout=300).stdout.split()
        assert after[0] == before, f"numpy moved from {before} to {after}"
        check = _run(py, "-m", "pip", "check", timeout=300)
        assert check.returncode == 0, check.stdout + check.stderr
        assert _run(py, "-c", CV2_OWNERS, timeout=300).stdout.split() == ["opencv-contrib-python"]

        models = tmp_path / "models"
        done = _run(py, "-m", "trainers", "models", "--dest", models, cwd=ROOT, timeout=900)
        assert done.returncode == 0, done.stderr
        code = ("import sys; from core.masks import detect, load_rgb; "
                "faces, hands = detect(load_rgb(sys.argv[1]), models_dir=sys.argv[2]); print(len(faces))")
        faces = _run(py, "-c", code, sample_photos[4], models, cwd=ROOT, timeout=300)
        assert faces.returncode == 0, faces.stderr[-3000:]
        assert int(faces.stdout.split()[-1]) >= 5  # sample5.jpg: five people, every face found
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~1.5 GB; pytest would keep it for a while
    print(f"fresh install, models and detection: {time.monotonic() - started:.0f} s")
