"""ComfyUI adapters: the only code of the pack that imports comfy, folder_paths or server.

Each feature module in this folder (one feature per module) exports NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS; they are merged here. Node ids never change once released: saved
workflows refer to them.
"""
from __future__ import annotations

import importlib
import pkgutil

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f".{_info.name}", __name__)
    NODE_CLASS_MAPPINGS.update(getattr(_module, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
