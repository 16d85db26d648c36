from __future__ import annotations

from pathlib import Path

import pytest

import comfyui_harness

# Fixture modules of each feature: tests/fixtures_*.py (tests/ is on pytest's pythonpath).
pytest_plugins = sorted(p.stem for p in Path(__file__).parent.glob("fixtures_*.py"))


def pytest_collection_modifyitems(config, items):
    reason = comfyui_harness.missing_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "comfyui" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd15():
    from core.tiny_models import build_tiny_pipeline

    return build_tiny_pipeline("tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from core.tiny_models import build_tiny_pipeline

    return build_tiny_pipeline("tiny-sdxl")
