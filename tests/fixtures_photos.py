"""Real photos of people (fetched once into ~/.cache/fairhuman-hgdpo/photos, never committed)
and their detections, shared by the mask, annotation and metric tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sample_photos():
    """The six face-api demo photos (list of paths); skips when npm cannot fetch them."""
    from trainers.photos import PhotosUnavailable, sample_photos

    try:
        return sample_photos()
    except PhotosUnavailable as err:
        pytest.skip(f"sample photos unavailable: {err}")


@pytest.fixture(scope="session")
def sample_detections(sample_photos):
    """{name: (rgb, faces, hands)} for sample2 and sample4, detected once per session."""
    from core.masks import detect, load_rgb

    found = {}
    for path in sample_photos:
        if path.name in ("sample2.jpg", "sample4.jpg"):
            rgb = load_rgb(path)
            found[path.name] = (rgb, *detect(rgb))
    return found
