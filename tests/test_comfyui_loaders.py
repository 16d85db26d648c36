"""The loader nodes in a real ComfyUI: a trainer-made LoRA applies fully and changes the output,
a LoRA for another architecture warns instead of crashing, a corrupt file is named."""
import pytest
import torch

from comfyui_harness import sampler_inputs, save_latent, txt2img_nodes

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]


@pytest.fixture(scope="module")
def server_with_models(comfy_server, comfy_sd15_checkpoint, trained_sd15_lora):
    ckpt = comfy_server.add_model("checkpoints", comfy_sd15_checkpoint)
    comfy_server.add_model("loras", trained_sd15_lora, "trained.safetensors")
    models = comfy_server.base_dir / "models"
    # the same tensors, declared as trained for SDXL: must be refused with a warning
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(trained_sd15_lora), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta["fairhuman.base_arch"] = '"sdxl"'
    save_file(tensors, str(models / "loras" / "declared_sdxl.safetensors"), metadata=meta)
    (models / "loras" / "corrupt.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file")
    return comfy_server, ckpt


def _graph(ckpt, lora, node="FairHumanLoraLoader"):
    loader = {"model": ["1", 0], "lora_name": lora, "strength": 1.0}
    if node == "FairHumanLoraLoader":
        loader["clip"] = ["1", 1]
    info_index = 2 if node == "FairHumanLoraLoader" else 1
    return {
        **txt2img_nodes(ckpt, prompt="two hands"),
        "2": {"class_type": node, "inputs": loader},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sampler_inputs(seed=3)}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **sampler_inputs(seed=3)}},
        "8": save_latent("6", "ld_base"),
        "9": save_latent("7", "ld_lora"),
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["2", info_index]}},
    }


@pytest.mark.parametrize("node", ["FairHumanLoraLoader", "HGDPOLoraLoader"])
def test_trainer_lora_applies_every_key(server_with_models, node):
    server, ckpt = server_with_models
    before = len(server.log())
    entry = server.run(_graph(ckpt, "trained.safetensors", node), timeout=900)
    log = server.log()[before:]
    assert "lora key not loaded" not in log and "ERROR lora" not in log, log[-2000:]
    info = entry["outputs"]["10"]["text"][0]
    assert "method=fairhuman" in info and "base_arch=sd15" in info
    modules = info.split(" LoRA modules")[0].split("from ")[-1]  # "N of N"
    applied, total = (int(v) for v in modules.split(" of "))
    assert applied == total > 0 and "WARNING" not in info
    assert (server.latest_latent("ld_lora") - server.latest_latent("ld_base")).abs().max() > 0


def test_lora_for_another_architecture_warns_instead_of_crashing(server_with_models):
    server, ckpt = server_with_models
    entry = server.run(_graph(ckpt, "declared_sdxl.safetensors"), timeout=900)
    info = entry["outputs"]["10"]["text"][0]
    assert "WARNING" in info and "trained for sdxl" in info and "model is sd15" in info
    assert torch.equal(server.latest_latent("ld_lora"), server.latest_latent("ld_base"))  # not applied


def test_corrupt_file_error_names_the_file(server_with_models):
    server, ckpt = server_with_models
    with pytest.raises(RuntimeError, match="corrupt.safetensors"):
        server.run(_graph(ckpt, "corrupt.safetensors"), timeout=300)
