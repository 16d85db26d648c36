"""The LAN Sampler node in a real ComfyUI on a checkpoint it detects as SD1.5."""
import pytest
import torch

from comfyui_harness import sampler_inputs, save_latent, txt2img_nodes

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

# a first-order, an ancestral (noise between steps), a multistep and ComfyUI's DDIM sampler; two of
# them heavy: each takes about a minute on a 2-vCPU VM, and CI keeps one sampler of each kind of
# state (none, a multistep history)
SAMPLERS = ["euler", pytest.param("euler_ancestral", marks=pytest.mark.heavy), "dpmpp_2m",
            pytest.param("ddim", marks=pytest.mark.heavy)]


def _graph(ckpt, lora, sampler_name, strength):
    common = sampler_inputs(seed=11, steps=3, cfg=2.0, sampler_name=sampler_name)
    return {
        **txt2img_nodes(ckpt, batch=2),
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                      "strength_model": 1.0, "strength_clip": 0.0}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **common}},  # tuned, plain
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **common}},  # reference, plain
        "8": {"class_type": "FairHumanLANSampler",
              "inputs": {"model": ["2", 0], "reference_model": ["1", 0], "lan_strength": strength, **common}},
        "9": save_latent("6", f"tuned_{sampler_name}"),
        "10": save_latent("7", f"ref_{sampler_name}"),
        "11": save_latent("8", f"lan{strength}_{sampler_name}"),
    }


@pytest.fixture(scope="module")
def comfy_with_lora(comfy_server, comfy_sd15_checkpoint, tmp_path_factory):
    """The random SD1.5 checkpoint and a strong random LoRA in our kohya layout."""
    from safetensors.torch import save_file

    from core.checkpoints.convert import shipped_config

    from diffusers import UNet2DConditionModel

    ckpt = comfy_server.add_model("checkpoints", comfy_sd15_checkpoint)

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
    lora = tmp_path_factory.mktemp("lan-lora") / "lan_test.safetensors"
    save_file(tensors, str(lora))
    return comfy_server, ckpt, comfy_server.add_model("loras", lora)


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_strength_zero_is_ksampler_and_one_matches_the_reference(comfy_with_lora, sampler_name):
    server, ckpt, lora = comfy_with_lora
    server.run(_graph(ckpt, lora, sampler_name, 0.0), timeout=900)
    tuned, ref, lan0 = (server.latest_latent(p) for p in (f"tuned_{sampler_name}", f"ref_{sampler_name}",
                                                          f"lan0.0_{sampler_name}"))
    assert torch.equal(lan0, tuned)  # bit for bit
    assert not torch.allclose(tuned, ref, atol=1e-3)  # the LoRA matters, so the next check is not vacuous

    server.run(_graph(ckpt, lora, sampler_name, 1.0), timeout=900)
    lan1 = server.latest_latent(f"lan1.0_{sampler_name}")
    dims = (2, 3)
    assert torch.allclose(lan1.mean(dims), ref.mean(dims), atol=1e-4)
    assert torch.allclose(lan1.std(dims, unbiased=False), ref.std(dims, unbiased=False), atol=1e-4)
    assert not torch.allclose(lan1, ref, atol=1e-3)  # the tuned model's content remains
