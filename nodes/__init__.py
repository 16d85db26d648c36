"""ComfyUI adapters: the only code of the pack that imports comfy, folder_paths, server or comfy_api.

Each feature module in this folder (one feature per module) exports ``NODES``, its node classes
on ComfyUI's versioned node API; ``node_api.PackExtension`` collects them for the pack's
``comfy_entrypoint``. Nothing is imported here, so the modules that need no ComfyUI (job_paths,
job_manager, train_inputs, train_lora, graph_data) import in tests without it. Node ids never
change once released: saved workflows refer to them.
"""
