"""ComfyUI adapters: the only code of the pack that imports comfy, folder_paths or server.

Each feature module exports NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS; they are merged
here. Node ids never change once released (saved workflows refer to them).
"""
from __future__ import annotations

import importlib
import logging

_FEATURES: tuple[str, ...] = ()

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _name in _FEATURES:
    _module = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

logging.getLogger(__name__).debug("loaded %d nodes", len(NODE_CLASS_MAPPINGS))
