"""Fixtures of the flow-transformer tests (test_flux.py, test_zimage.py)."""
from __future__ import annotations

import pytest

from train_helpers import make_region_dataset


@pytest.fixture(scope="session")
def region_dataset_64(tmp_path_factory):
    """Four 64² images with face and hand masks (make_region_dataset): what the tiny transformers train on."""
    return make_region_dataset(tmp_path_factory.mktemp("regions64"), size=64)
