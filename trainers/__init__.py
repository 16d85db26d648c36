"""Training jobs and the command line (``python -m trainers ...``), run as their own process.

This package imports ``core`` as a top-level package: it runs with the pack root as working
directory (or on ``PYTHONPATH``), never inside ComfyUI's process.
"""
