"""The real ComfyUI servers of the `comfyui` tests, one per tree found (comfyui_harness), and the
full-size checkpoints with random weights that ComfyUI itself detects as SD1.5 for the tests that
run graphs in them: built once from the pack's shipped configs (seeded, fp16), saved in the
original single-file layout, cached outside git.

Every `comfyui` test runs on every tree, except the `heavy` ones: those run on the newest tree
only, unless COMFYUI_ALL_TREES=1."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import comfyui_harness
from trainers.photos import cache_root

TREES = comfyui_harness.comfyui_trees()


@pytest.fixture(scope="session", params=TREES or [None],
                ids=[comfyui_harness.version_label(t) for t in TREES] or ["no-comfyui"])
def comfy_server(request, tmp_path_factory):
    """A real ComfyUI server of one tree (the tests run once per tree), with this pack in its
    custom_nodes; one at a time: pytest groups the tests by tree."""
    if request.param is None:
        pytest.skip(comfyui_harness.missing_reason())
    base = tmp_path_factory.mktemp(f"comfyui-{comfyui_harness.version_label(request.param)}")
    server = comfyui_harness.ComfyServer(base, tree=request.param).start()
    yield server
    server.stop()


def pytest_collection_modifyitems(config, items):
    """Heavy tests on the newest tree only (unless COMFYUI_ALL_TREES=1): deselected elsewhere."""
    if len(TREES) < 2 or comfyui_harness.heavy_on_all_trees():
        return
    keep, dropped = [], []
    for item in items:
        tree = getattr(item, "callspec", None) and item.callspec.params.get("comfy_server")
        (dropped if "heavy" in item.keywords and tree in TREES[:-1] else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def build_random_checkpoint(arch: str, path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.checkpoints.convert import shipped_config
    from ldm_export import save_single_file

    if arch != "sd15":
        raise ValueError("only sd15 is built here: a full SDXL needs ~20 GB to run on a CPU")
    torch.manual_seed(seed)
    pipe = SimpleNamespace(
        unet=UNet2DConditionModel(**shipped_config("sd15_unet")).half(),
        vae=AutoencoderKL(**shipped_config("sd15_vae")).half(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**shipped_config("clip_l_text_encoder"))).half(),
    )
    tmp = path.with_suffix(".tmp")
    save_single_file(pipe, tmp)
    os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def comfy_sd15_checkpoint() -> Path:
    path = cache_root() / "comfy-models" / "sd15-random-fp16.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_random_checkpoint("sd15", path)
    return path


@pytest.fixture(scope="session")
def trained_sd15_lora(tmp_path_factory, comfy_sd15_checkpoint) -> Path:
    """A FairHuman LoRA made by this pack's trainer (1 step) on the full-size SD1.5 checkpoint."""
    from train_helpers import make_region_dataset, train_in_own_process

    data = make_region_dataset(tmp_path_factory.mktemp("regions"), count=2, size=64)
    run = tmp_path_factory.mktemp("run")
    tree = comfyui_harness.comfyui_tree()
    if tree is None:
        pytest.skip("needs ComfyUI's CLIP vocabulary: " + str(comfyui_harness.missing_reason()))
    # The trainer finds CLIP's real vocabulary in the ComfyUI tree: no hub, no download.
    os.environ.setdefault("COMFYUI_PATH", str(tree))
    result = train_in_own_process("--method", "fairhuman", "--base", comfy_sd15_checkpoint, "--data", data,
                                  "--output", run, "--steps", 1, "--resolution", 64, "--rank", 4, "--lr", "1e-3",
                                  "--batch-size", 1, "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run / "fairhuman_sd15.safetensors"
