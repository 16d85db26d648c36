"""The LAN Sampler node in a real ComfyUI on a checkpoint it detects as SD1.5."""
import pytest
import torch

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "ddim"]


def _graph(ckpt, lora, sampler_name, strength):
    common = {"seed": 11, "steps": 3, "cfg": 2.0, "sampler_name": sampler_name, "scheduler": "normal",
              "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                      "strength_model": 1.0, "strength_clip": 0.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of hands"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **common}},  # tuned, plain
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **common}},  # reference, plain
        "8": {"class_type": "FairHumanLANSampler",
              "inputs": {"model": ["2", 0], "reference_model": ["1", 0], "lan_strength": strength, **common}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"tuned_{sampler_name}"}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"ref_{sampler_name}"}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0],
                                                      "filename_prefix": f"lan{strength}_{sampler_name}"}},
    }


def _latest(folder, prefix):
    from safetensors.torch import load_file

    return load_file(str(sorted(folder.glob(f"{prefix}_*.latent"))[-1]))["latent_tensor"]


@pytest.fixture(scope="module")
def comfy_with_lora(comfy_server, comfy_sd15_checkpoint, tmp_path_factory):
    """The random SD1.5 checkpoint and a strong random LoRA in our kohya layout."""
    from safetensors.torch import save_file

    from core.checkpoint_convert import shipped_config

    models = comfy_server.base_dir / "models"
    for kind in ("checkpoints", "loras"):
        (models / kind).mkdir(parents=True, exist_ok=True)
    ckpt = models / "checkpoints" / comfy_sd15_checkpoint.name
    if not ckpt.exists():
        ckpt.symlink_to(comfy_sd15_checkpoint)
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**shipped_config("sd15_unet"))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=g) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(4.0)
    lora = models / "loras" / "lan_test.safetensors"
    save_file(tensors, str(lora))
    return comfy_server, ckpt.name, lora.name


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_strength_zero_is_ksampler_and_one_matches_the_reference(comfy_with_lora, sampler_name):
    server, ckpt, lora = comfy_with_lora
    out = server.base_dir / "output"
    server.run(_graph(ckpt, lora, sampler_name, 0.0), timeout=900)
    tuned, ref, lan0 = (_latest(out, p) for p in (f"tuned_{sampler_name}", f"ref_{sampler_name}", f"lan0.0_{sampler_name}"))
    assert torch.equal(lan0, tuned)  # bit for bit
    assert not torch.allclose(tuned, ref, atol=1e-3)  # the LoRA matters, so the next check is not vacuous

    server.run(_graph(ckpt, lora, sampler_name, 1.0), timeout=900)
    lan1 = _latest(out, f"lan1.0_{sampler_name}")
    dims = (2, 3)
    assert torch.allclose(lan1.mean(dims), ref.mean(dims), atol=1e-4)
    assert torch.allclose(lan1.std(dims, unbiased=False), ref.std(dims, unbiased=False), atol=1e-4)
    assert not torch.allclose(lan1, ref, atol=1e-3)  # the tuned model's content remains
