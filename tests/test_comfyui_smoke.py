"""The pack inside a real ComfyUI: it imports and every node class is registered."""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

ROOT = Path(__file__).resolve().parents[1]


def _pack_node_ids() -> set[str]:
    """Node ids declared in nodes/*.py (read from source: `nodes` must not be imported here,
    ComfyUI owns that top-level name)."""
    ids = set()
    for path in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "NODE_CLASS_MAPPINGS" for t in node.targets
            ) and isinstance(node.value, ast.Dict):
                ids |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return ids


def test_pack_imports_without_failure(comfy_server):
    log = comfy_server.log()
    assert "Import times for custom nodes" in log, log[-3000:]
    pack_lines = [line for line in log.splitlines() if "fairhuman-hgdpo" in line]
    assert pack_lines, "the pack was not seen by ComfyUI"
    assert not [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line], log[-3000:]


def test_every_node_is_registered(comfy_server):
    info = comfy_server.object_info()
    assert len(info) > 100  # ComfyUI's own nodes are there: this is a real server
    missing = _pack_node_ids() - set(info)
    assert not missing, f"nodes missing from /object_info: {sorted(missing)}"
