"""The "Hand/Face Masks" node in a real ComfyUI: the shipped workflow runs through /prompt."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_harness import FRONTEND_ONLY_NODES, workflow_to_api

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "hand_face_masks.json"
NODE_ID = "FairHumanHandFaceMasks"


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def test_node_is_described(comfy_server):
    info = comfy_server.object_info()[NODE_ID]
    assert info["display_name"] == "Hand/Face Masks" and info["category"] == "FairHuman"
    assert info["output_name"] == ["face_mask", "hand_mask", "preview"]
    assert info["output"] == ["MASK", "MASK", "IMAGE"]
    required = info["input"]["required"]
    for name in ("images", "min_confidence", "padding", "dilation", "faces", "hands"):
        assert required[name][1]["tooltip"], name


def test_shipped_workflow_runs_on_a_group_photo_and_an_empty_scene(comfy_server, sample_photos):
    inputs = comfy_server.base_dir / "input"
    inputs.mkdir(exist_ok=True)
    shutil.copyfile(sample_photos[1], inputs / "sample2.jpg")
    Image.new("RGB", (256, 192), (90, 110, 130)).save(inputs / "wall.png")

    info = comfy_server.object_info()
    workflow = json.loads(WORKFLOW.read_text())
    assert {n["type"] for n in workflow["nodes"]} - set(FRONTEND_ONLY_NODES) <= set(info)
    prompt = workflow_to_api(workflow, info)
    load = next(k for k, v in prompt.items() if v["class_type"] == "LoadImage")
    masks = next(k for k, v in prompt.items() if v["class_type"] == NODE_ID)
    assert set(prompt[masks]["inputs"]) >= {"images", "min_confidence", "padding", "dilation", "faces", "hands"}
    # the preview node fed by each output of the masks node
    previews = {}
    for key, node in prompt.items():
        if node["class_type"] == "PreviewImage":
            source = node["inputs"]["images"][0]
            origin = prompt[source]
            slot = origin["inputs"]["mask"][1] if origin["class_type"] == "MaskToImage" else 2
            previews[("face_mask", "hand_mask", "preview")[slot]] = key

    group = copy.deepcopy(prompt)
    group[load]["inputs"]["image"] = "sample2.jpg"
    entry = comfy_server.run(group)
    face = _pixels(comfy_server.outputs(entry, previews["face_mask"])[0])
    hand = _pixels(comfy_server.outputs(entry, previews["hand_mask"])[0])
    preview = comfy_server.outputs(entry, previews["preview"])[0]
    assert face.shape == hand.shape == (1367, 1920)
    assert 0.01 < (face > 127).mean() < 0.3 and 0.002 < (hand > 127).mean() < 0.2
    with Image.open(preview) as im:
        assert im.size == (1920, 1367)

    empty = copy.deepcopy(prompt)
    empty[load]["inputs"]["image"] = "wall.png"
    entry = comfy_server.run(empty)
    assert not _pixels(comfy_server.outputs(entry, previews["face_mask"])[0]).any()
    assert not _pixels(comfy_server.outputs(entry, previews["hand_mask"])[0]).any()
