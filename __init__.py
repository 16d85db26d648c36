"""FairHuman and HG-DPO for ComfyUI: the pack's entry point (classic NODE_CLASS_MAPPINGS API)."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
