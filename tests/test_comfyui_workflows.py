"""Every shipped workflow is valid for the real ComfyUI it will be dragged into: node types
exist, links join outputs and inputs of the same type, widget values fit their inputs."""
import json
from pathlib import Path

import pytest

from comfyui_harness import FRONTEND_ONLY_NODES, is_widget_input

pytestmark = pytest.mark.comfyui

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
FILE_LISTS = ("ckpt_name", "lora_name", "control_net_name", "image")  # depend on the user's files


def _declared(info_node):
    spec = info_node["input"]
    return {**spec.get("required", {}), **spec.get("optional", {})}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_fits_this_comfyui(comfy_server, path):
    info = comfy_server.object_info()
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY_NODES}
    assert len(nodes) < len(workflow["nodes"]), f"{path.name} has no Note explaining it"
    assert {n["type"] for n in nodes.values()} <= set(info), path.name
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        produced = info[nodes[src]["type"]]["output"][src_slot]
        slot = nodes[dst]["inputs"][dst_slot]
        wanted = _declared(info[nodes[dst]["type"]])[slot["name"]][0]
        assert produced == kind and slot["link"] == link_id, (path.name, link_id)
        assert wanted in (kind, "*") or (isinstance(wanted, str) and kind in wanted.split(",")), (path.name, link_id)
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
                assert isinstance(value, str), (path.name, node["type"], name)
                if name not in FILE_LISTS:
                    assert value in choices, (path.name, node["type"], name, value)
            elif kind in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value), (node["type"], name)
            if options.get("control_after_generate"):  # the UI's extra "control" widget
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
            if options.get("image_upload") and values:  # the UI's extra upload button
                values.pop(0)
        assert not values, f"{path.name}: {node['type']} has {len(values)} widget values too many"
