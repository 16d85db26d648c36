"""The loader nodes in a real ComfyUI: a trainer-made LoRA applies fully and changes the output,
a LoRA for another architecture warns instead of crashing, a corrupt file is named."""
import shutil

import pytest
import torch

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]


@pytest.fixture(scope="module")
def server_with_models(comfy_server, comfy_sd15_checkpoint, trained_sd15_lora):
    models = comfy_server.base_dir / "models"
    for kind in ("checkpoints", "loras"):
        (models / kind).mkdir(parents=True, exist_ok=True)
    ckpt = models / "checkpoints" / comfy_sd15_checkpoint.name
    if not ckpt.exists():
        ckpt.symlink_to(comfy_sd15_checkpoint)
    shutil.copyfile(trained_sd15_lora, models / "loras" / "trained.safetensors")
    # the same tensors, declared as trained for SDXL: must be refused with a warning
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(trained_sd15_lora), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta["fairhuman.base_arch"] = '"sdxl"'
    save_file(tensors, str(models / "loras" / "declared_sdxl.safetensors"), metadata=meta)
    (models / "loras" / "corrupt.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file")
    return comfy_server, ckpt.name


def _graph(ckpt, lora, node="FairHumanLoraLoader"):
    sampler = {"seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
               "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0]}
    loader = {"model": ["1", 0], "lora_name": lora, "strength": 1.0}
    if node == "FairHumanLoraLoader":
        loader["clip"] = ["1", 1]
    info_index = 2 if node == "FairHumanLoraLoader" else 1
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": node, "inputs": loader},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "two hands"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sampler}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **sampler}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "ld_base"}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "ld_lora"}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["2", info_index]}},
    }


def _latest(folder, prefix):
    from safetensors.torch import load_file

    return load_file(str(sorted(folder.glob(f"{prefix}_*.latent"))[-1]))["latent_tensor"]


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
    out = server.base_dir / "output"
    assert (_latest(out, "ld_lora") - _latest(out, "ld_base")).abs().max() > 0


def test_lora_for_another_architecture_warns_instead_of_crashing(server_with_models):
    server, ckpt = server_with_models
    entry = server.run(_graph(ckpt, "declared_sdxl.safetensors"), timeout=900)
    info = entry["outputs"]["10"]["text"][0]
    assert "WARNING" in info and "trained for sdxl" in info and "model is sd15" in info
    out = server.base_dir / "output"
    assert torch.equal(_latest(out, "ld_lora"), _latest(out, "ld_base"))  # not applied


def test_corrupt_file_error_names_the_file(server_with_models):
    server, ckpt = server_with_models
    with pytest.raises(RuntimeError, match="corrupt.safetensors"):
        server.run(_graph(ckpt, "corrupt.safetensors"), timeout=300)
