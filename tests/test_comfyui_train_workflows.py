"""Every shipped workflow, in its API form (as the browser would queue it), executes in a real
ComfyUI: the model files swapped for the test's (the full-size random SD1.5 checkpoint, a LoRA
the training workflow made), images at 64 px, one sampler step, training with 1 step. The
training workflows run first: the others sample with the LoRA the FairHuman one trained. (The
ControlNet sampling workflow has its own test, tests/test_comfyui_controlnet.py.)"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from comfyui_harness import workflow_to_api

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, pytest.mark.heavy]

# The workflows of the training issue and the three before it; the others' tests run their own.
NAMES = ("train_fairhuman_lora.json", "train_hgdpo_lora.json", "train_fairhuman_controlnet.json",
         "fairhuman_lora.json", "hand_face_masks.json", "hgdpo_lan_sampler.json",
         "train_fairhuman_lora_from_graph.json", "train_fairhuman_lora_dataset_nodes.json")
PAINTED = "workflow_painted.png"  # a photo whose alpha marks a region: LoadImage's MASK, the face masks
NEEDS = {"train_fairhuman_lora_dataset_nodes.json": "LoadImageTextDataSetFromFolder"}  # ComfyUI 0.33's
WORKFLOWS = [Path(__file__).resolve().parents[1] / "workflows" / name for name in NAMES]
TRAINED = "fairhuman/workflow train_fairhuman_lora.safetensors"
SMALL = {
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 1, "cfg": 1.0},
    "FairHumanLANSampler": {"steps": 1, "cfg": 1.0},
    "FairHumanTrainLoRA": {"dataset": "workflow photos", "steps": 1, "resolution": 64, "rank": 4,
                           "learning_rate": 1e-3, "mixed_precision": "no", "checkpoint_every": 0},
    # the frozen UNet in bf16: a full-size fp32 ControlNet run peaks above 13 GB on the CPU
    "FairHumanTrainControlNet": {"dataset": "workflow photos", "steps": 1, "resolution": 64, "learning_rate": 1e-3,
                                 "mixed_precision": "bf16", "checkpoint_every": 0},
    "HGDPOTrainLoRA": {"prompts": "a photo of a person waving\ntwo people shaking hands", "images_per_prompt": 3,
                       "steps": 1, "resolution": 64, "rank": 4, "learning_rate": 1e-3, "sampling_steps": 2,
                       "mixed_precision": "no", "checkpoint_every": 0},
}


@pytest.fixture(scope="module")
def server(comfy_server, comfy_sd15_checkpoint, sample_photos):
    comfy_server.add_model("checkpoints", comfy_sd15_checkpoint)
    photos = comfy_server.base_dir / "input" / "workflow photos"
    photos.mkdir(parents=True, exist_ok=True)
    for path in sample_photos[:2]:
        shutil.copy(path, photos / path.name)
    shutil.copy(sample_photos[0], comfy_server.base_dir / "input" / "workflow_photo.jpg")
    painted = Image.open(sample_photos[0]).convert("RGB").resize((96, 64))
    alpha = Image.new("L", painted.size, 255)
    alpha.paste(0, (20, 10, 50, 40))
    painted.putalpha(alpha)
    painted.save(comfy_server.base_dir / "input" / PAINTED)
    return comfy_server


def small_api(server, path: Path) -> dict:
    api = workflow_to_api(json.loads(path.read_text()), server.object_info())
    files = {"ckpt_name": Path(server.base_dir / "models" / "checkpoints").glob("*.safetensors"),
             "lora_name": [TRAINED], "image": ["workflow_photo.jpg"]}
    files["ckpt_name"] = [p.name for p in files["ckpt_name"]]
    if path.name == "train_fairhuman_lora_from_graph.json":
        files["image"] = [PAINTED]
    files["folder"] = ["workflow photos"]
    for node_id, node in api.items():
        inputs = node["inputs"]
        for name in files:
            if name in inputs and isinstance(inputs[name], str):
                inputs[name] = files[name][0]
        inputs.update(SMALL.get(node["class_type"], {}))
        if "output_name" in inputs:
            inputs["output_name"] = f"workflow {path.stem}"
    return api


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_api_form_executes(server, path):
    if path.name in NEEDS and NEEDS[path.name] not in server.object_info():
        pytest.skip(f"{path.name} uses {NEEDS[path.name]}, which this ComfyUI does not have")
    api = small_api(server, path)
    if any("lora_name" in n["inputs"] for n in api.values()) and not (
            server.base_dir / "models" / "loras" / TRAINED).is_file():
        pytest.skip("needs the LoRA of train_fairhuman_lora.json, which did not train")
    before = len(server.log())
    entry = server.run(api, timeout=1800)
    log = server.log()[before:]
    assert "lora key not loaded" not in log, log[-2000:]
    outputs = entry["outputs"]
    saved = [item for out in outputs.values() for item in out.get("images", [])]
    assert saved, f"{path.name}: no image came out"
    folders = {"FairHumanTrainLoRA": "loras", "HGDPOTrainLoRA": "loras", "FairHumanTrainControlNet": "controlnet"}
    for node in api.values():
        if node["class_type"] in folders:
            trained = server.base_dir / "models" / folders[node["class_type"]] / "fairhuman" / f"workflow {path.stem}.safetensors"
            assert trained.is_file(), f"{path.name}: the trained file is missing"
