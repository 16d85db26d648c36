"""A LoRA made by this pack's trainer, on a checkpoint ComfyUI detects as SD1.5, loaded by
ComfyUI's own LoraLoader: every key consumed, and the sampled latent changes."""
import pytest
import torch

from comfyui_harness import sampler_inputs, save_latent, txt2img_nodes

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]


def test_comfyui_lora_loader_consumes_every_key(comfy_server, comfy_sd15_checkpoint, trained_sd15_lora):
    ckpt = comfy_server.add_model("checkpoints", comfy_sd15_checkpoint)
    lora = comfy_server.add_model("loras", trained_sd15_lora)
    graph = {
        **txt2img_nodes(ckpt),
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sampler_inputs(seed=7)}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **sampler_inputs(seed=7)}},
        "8": save_latent("6", "base"),
        "9": save_latent("7", "lora"),
    }
    before = len(comfy_server.log())
    comfy_server.run(graph, timeout=900)
    log = comfy_server.log()[before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log and "ERROR lora" not in log, log[-3000:]
    base, tuned = comfy_server.latest_latent("base"), comfy_server.latest_latent("lora")
    assert base.shape == tuned.shape == (1, 4, 8, 8)
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 0  # the LoRA acts
