"""The pack inside a real ComfyUI: it imports and every node class is registered."""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

ROOT = Path(__file__).resolve().parents[1]
PACK = "fairhuman-hgdpo"  # the pack's folder in custom_nodes (comfyui_harness.PACK_FOLDER)


def _pack_node_ids() -> set[str]:
    """Node ids declared in nodes/*.py: each ``node_id=...`` of a schema, and the Train nodes'
    ``NODE_ID``s (read from source: `nodes` must not be imported here, ComfyUI owns that
    top-level name)."""
    ids = set()
    for path in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "node_id" and isinstance(node.value, ast.Constant):
                ids.add(node.value.value)
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Tuple) and any(
                    isinstance(e, ast.Name) and e.id == "NODE_ID" for e in t.elts) for t in node.targets):
                ids.add(node.value.elts[-1].value)
    return ids


def test_pack_imports_without_failure(comfy_server):
    log = comfy_server.log()
    assert "Import times for custom nodes" in log, log[-3000:]
    pack_lines = [line for line in log.splitlines() if PACK in line]
    assert pack_lines, "the pack was not seen by ComfyUI"
    assert not [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line], log[-3000:]


def test_every_node_is_registered(comfy_server):
    info = comfy_server.object_info()
    assert len(info) > 100  # ComfyUI's own nodes are there: this is a real server
    ids = _pack_node_ids()
    assert len(ids) == 9, ids
    missing = ids - set(info)
    assert not missing, f"nodes missing from /object_info: {sorted(missing)}"


def test_the_pack_registers_through_the_versioned_node_api(comfy_server):
    """comfy_entrypoint, not NODE_CLASS_MAPPINGS: the Train nodes' schema reached ComfyUI (their
    hidden inputs: the node's id for its progress text, and what an output node gets), and
    ComfyUI's loader complained about nothing of the pack's."""
    info = comfy_server.object_info()
    for node_id in ("FairHumanTrainLoRA", "FairHumanTrainControlNet", "HGDPOTrainLoRA"):
        assert info[node_id]["input"]["hidden"] == {"unique_id": ["UNIQUE_ID"], "prompt": ["PROMPT"],
                                                    "extra_pnginfo": ["EXTRA_PNGINFO"]}, node_id
    complaints = [line for line in comfy_server.log().splitlines()
                  if PACK in line and ("comfy_entrypoint" in line or "Skip" in line)]
    assert not complaints, complaints
