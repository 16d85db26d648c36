"""Every shipped workflow, and every workflow as main saved it at SAVED_BY, is valid for the real
ComfyUI it will be dragged into: node types exist, links join outputs and inputs of the same type,
widget values fit their inputs. (A workflow built on nodes of a newer ComfyUI is checked where
they exist: NEEDS.)"""
import json
import subprocess
from pathlib import Path

import pytest

from comfyui_harness import FRONTEND_ONLY_NODES, is_widget_input

pytestmark = pytest.mark.comfyui

ROOT = Path(__file__).resolve().parents[1]
SAVED_BY = "1c30921"  # the main whose saved workflows must keep loading (tests/test_job_spec.py's)
FILE_LISTS = ("ckpt_name", "lora_name", "control_net_name", "image", "folder", "unet_name", "clip_name1",  # depend on
              "clip_name2", "vae_name", "diffusion_model", "text_encoder_1", "text_encoder_2", "vae")  # the user's files
NEEDS = {"train_fairhuman_lora_dataset_nodes.json": "LoadImageTextDataSetFromFolder"}  # ComfyUI 0.33's


def _workflows() -> list:
    """(name, workflow): the shipped ones, then those of SAVED_BY (when git has that commit)."""
    found = [pytest.param(p.name, json.loads(p.read_text()), id=p.name) for p in sorted((ROOT / "workflows").glob("*.json"))]
    listing = subprocess.run(["git", "ls-tree", "--name-only", SAVED_BY, "workflows/"], cwd=ROOT, capture_output=True,
                             text=True)
    for name in listing.stdout.split() if listing.returncode == 0 else []:
        text = subprocess.run(["git", "show", f"{SAVED_BY}:{name}"], cwd=ROOT, capture_output=True, text=True).stdout
        found.append(pytest.param(Path(name).name, json.loads(text), id=f"{SAVED_BY}-{Path(name).name}"))
    return found


def _declared(info_node):
    spec = info_node["input"]
    return {**spec.get("required", {}), **spec.get("optional", {})}


@pytest.mark.parametrize("name, workflow", _workflows())
def test_workflow_fits_this_comfyui(comfy_server, name, workflow):
    info = comfy_server.object_info()
    if name in NEEDS and NEEDS[name] not in info:
        pytest.skip(f"{name} uses {NEEDS[name]}, which this ComfyUI does not have")
    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY_NODES}
    assert len(nodes) < len(workflow["nodes"]), f"{name} has no Note explaining it"
    assert {n["type"] for n in nodes.values()} <= set(info), name
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        produced = info[nodes[src]["type"]]["output"][src_slot]
        slot = nodes[dst]["inputs"][dst_slot]
        wanted = _declared(info[nodes[dst]["type"]])[slot["name"]][0]
        assert produced == kind and slot["link"] == link_id, (name, link_id)
        assert wanted in (kind, "*") or (isinstance(wanted, str) and kind in wanted.split(",")), (name, link_id)
    for node in nodes.values():
        linked = {s["name"] for s in node.get("inputs", []) if s.get("link") is not None}
        values = list(node.get("widgets_values", []))
        for name, spec in _declared(info[node["type"]]).items():
            if name in linked or not values or not is_widget_input(spec):
                continue
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            value = values.pop(0)
            if isinstance(kind, list) or kind == "COMBO":
                choices = kind if isinstance(kind, list) else options.get("options", [])
                assert isinstance(value, str), (name, node["type"], name)
                if name not in FILE_LISTS:
                    assert value in choices, (name, node["type"], name, value)
            elif kind in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value), (node["type"], name)
            if options.get("control_after_generate"):  # the UI's extra "control" widget
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
            if options.get("image_upload") and values:  # the UI's extra upload button
                values.pop(0)
        assert not values, f"{name}: {node['type']} has {len(values)} widget values too many"
