"""Full-size checkpoints with random weights that ComfyUI itself detects as SD1.5, for the tests
that run graphs in a real ComfyUI. Built once from the pack's shipped configs (seeded, fp16),
saved in the original single-file layout, cached outside git."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.photos import cache_root


def build_random_checkpoint(arch: str, path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.checkpoint_convert import shipped_config
    from core.checkpoint_export import save_single_file

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
