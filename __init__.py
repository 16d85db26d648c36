"""FairHuman and HG-DPO for ComfyUI: the pack's entry point (classic NODE_CLASS_MAPPINGS API)."""
if __package__:  # ComfyUI imports the pack as a package (named after its folder)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a lone module, e.g. by pytest setting up the pack root: no nodes outside ComfyUI
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

# The browser extension (the training-jobs panel), served by ComfyUI as /extensions/<folder>/.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
