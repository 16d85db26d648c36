"""Full-size checkpoints with random weights that ComfyUI itself detects as SD1.5, for the tests
that run graphs in a real ComfyUI. Built once from the pack's shipped configs (seeded, fp16),
saved in the original single-file layout, cached outside git."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainers.photos import cache_root


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
    import comfyui_harness
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
