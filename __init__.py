"""FairHuman and HG-DPO for ComfyUI: the pack's entry point, on ComfyUI's versioned node API
(``comfy_entrypoint`` returning a ``ComfyExtension``; see nodes/node_api.py).

No ``NODE_CLASS_MAPPINGS`` here: ComfyUI's loader takes those first when a pack has them, and the
nodes are registered through ``comfy_entrypoint`` instead. Nothing is imported at import time, so
pytest and other tools can import the package without ComfyUI.
"""

# The browser extension (the training-jobs panel), served by ComfyUI as /extensions/<folder>/.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.node_api import PackExtension

    return PackExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
