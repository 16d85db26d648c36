"""A LoRA made by this pack's trainer, on a checkpoint ComfyUI detects as SD1.5, loaded by
ComfyUI's own LoraLoader: every key consumed, and the sampled latent changes."""
import shutil

import pytest
import torch

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]


def _graph(ckpt: str, lora: str) -> dict:
    sampler = {"seed": 7, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
               "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0]}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of hands"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sampler}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **sampler}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "base"}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "lora"}},
    }


def test_comfyui_lora_loader_consumes_every_key(comfy_server, comfy_sd15_checkpoint, trained_sd15_lora):
    from safetensors.torch import load_file

    models = comfy_server.base_dir / "models"
    for kind, src in (("checkpoints", comfy_sd15_checkpoint), ("loras", trained_sd15_lora)):
        (models / kind).mkdir(parents=True, exist_ok=True)
        dst = models / kind / src.name
        if not dst.exists():
            dst.symlink_to(src) if kind == "checkpoints" else shutil.copyfile(src, dst)
    before = len(comfy_server.log())
    comfy_server.run(_graph(comfy_sd15_checkpoint.name, trained_sd15_lora.name), timeout=900)
    log = comfy_server.log()[before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log and "ERROR lora" not in log, log[-3000:]
    output = comfy_server.base_dir / "output"
    base = load_file(str(sorted(output.glob("base_*.latent"))[-1]))["latent_tensor"]
    tuned = load_file(str(sorted(output.glob("lora_*.latent"))[-1]))["latent_tensor"]
    assert base.shape == tuned.shape == (1, 4, 8, 8)
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 0  # the LoRA acts
