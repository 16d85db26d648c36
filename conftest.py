"""pytest only (ComfyUI never imports this file).

The pack root is a Python package for ComfyUI, whose ``__init__.py`` imports the nodes, which
import ComfyUI's own modules. pytest would import that ``__init__.py`` to set up the package;
collect the root as a plain directory instead. Tests import ``core`` and ``trainers`` directly.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def pytest_collect_directory(path, parent):
    if Path(path) == ROOT:
        return pytest.Dir.from_parent(parent, path=Path(path))
    return None
