"""The engine: pure torch / numpy / mediapipe / safetensors.

No ComfyUI and no training loop live here. Modules import each other relatively so the package
works both as ``<pack>.core`` inside ComfyUI and as top-level ``core`` in the trainer process.
"""
