"""A ControlNet made by this pack's trainer (2 steps, full-size random SD1.5 checkpoint, 64 px),
in a real ComfyUI: ComfyUI's ControlNetLoader and the pack's loader both load it,
ControlNetApplyAdvanced with it changes the sampled latent, and the shipped workflow runs."""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfyui_harness import sampler_inputs, save_latent, txt2img_nodes, workflow_to_api
from controlnet_helpers import make_conditioned_dataset, stick_figure

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "fairhuman_controlnet.json"


@pytest.fixture(scope="module")
def trained_controlnet(tmp_path_factory, comfy_sd15_checkpoint):
    import comfyui_harness
    from train_helpers import train_in_own_process

    data = make_conditioned_dataset(tmp_path_factory.mktemp("regions"), count=2, size=64)
    tree = comfyui_harness.comfyui_tree()
    if tree is None:
        pytest.skip("needs ComfyUI's CLIP vocabulary: " + str(comfyui_harness.missing_reason()))
    os.environ.setdefault("COMFYUI_PATH", str(tree))
    run = tmp_path_factory.mktemp("run")
    result = train_in_own_process("--method", "fairhuman-controlnet", "--base", comfy_sd15_checkpoint, "--data",
                                  data, "--output", run, "--steps", 2, "--resolution", 64, "--lr", "1e-3",
                                  "--batch-size", 1, "--condition-dropout", 0, "--checkpoint-every", 0,
                                  "--batched-vjp", "false",
                                  # the frozen UNet in bf16: the fp32 full-size run peaks above 13 GB on the CPU
                                  "--mixed-precision", "bf16")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run / "fairhumancontrolnet_sd15.safetensors"


def test_both_loaders_load_it_and_it_changes_the_sample(comfy_server, comfy_sd15_checkpoint, trained_controlnet):
    ckpt = comfy_server.add_model("checkpoints", comfy_sd15_checkpoint)
    net = comfy_server.add_model("controlnet", trained_controlnet)
    (comfy_server.base_dir / "input").mkdir(exist_ok=True)
    Image.fromarray(stick_figure(64, 9)).save(comfy_server.base_dir / "input" / "pose_test.png")

    def apply(loader):
        return {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["3", 0], "negative": ["4", 0], "control_net": [loader, 0], "image": ["10", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}

    graph = {
        **txt2img_nodes(ckpt),
        "10": {"class_type": "LoadImage", "inputs": {"image": "pose_test.png"}},
        "11": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": net}},
        "12": {"class_type": "FairHumanControlNetLoader", "inputs": {"control_net_name": net}},
        "13": apply("11"),
        "14": apply("12"),
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sampler_inputs(seed=7)}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sampler_inputs(seed=7),
                                                  "positive": ["13", 0], "negative": ["13", 1]}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sampler_inputs(seed=7),
                                                  "positive": ["14", 0], "negative": ["14", 1]}},
        "20": save_latent("6", "cn_base"),
        "21": save_latent("7", "cn_comfy"),
        "22": save_latent("8", "cn_pack"),
        "23": {"class_type": "PreviewAny", "inputs": {"source": ["12", 1]}},
    }
    entry = comfy_server.run(graph, timeout=900)
    base, comfy, pack = (comfy_server.latest_latent(p) for p in ("cn_base", "cn_comfy", "cn_pack"))
    assert base.shape == comfy.shape == (1, 4, 8, 8)
    assert torch.isfinite(comfy).all() and (comfy - base).abs().max() > 1e-4  # the ControlNet acts
    assert torch.allclose(comfy, pack)  # the pack's loader gives ComfyUI's ControlNet
    info = json.dumps(entry["outputs"].get("23", {}))
    assert "fairhuman-controlnet" in info


def test_the_shipped_workflow_executes(comfy_server, comfy_sd15_checkpoint, trained_controlnet):
    ckpt = comfy_server.add_model("checkpoints", comfy_sd15_checkpoint)
    net = comfy_server.add_model("controlnet", trained_controlnet)
    (comfy_server.base_dir / "input").mkdir(exist_ok=True)
    Image.fromarray(stick_figure(64, 3)).save(comfy_server.base_dir / "input" / "pose_wf.png")
    api = workflow_to_api(json.loads(WORKFLOW.read_text()), comfy_server.object_info())
    for node in api.values():  # the user's files and a CPU-sized run
        inputs = node["inputs"]
        {"CheckpointLoaderSimple": lambda: inputs.update(ckpt_name=ckpt),
         "LoadImage": lambda: inputs.update(image="pose_wf.png"),
         "FairHumanControlNetLoader": lambda: inputs.update(control_net_name=net),
         "EmptyLatentImage": lambda: inputs.update(width=64, height=64),
         "KSampler": lambda: inputs.update(steps=1)}.get(node["class_type"], lambda: None)()
    entry = comfy_server.run(api, timeout=900)
    saved = [p for node_id, node in api.items() if node["class_type"] == "SaveImage"
             for p in comfy_server.outputs(entry, node_id)]
    assert saved and all(p.is_file() for p in saved)
