"""Real photos of people (fetched once into ~/.cache/fairhuman-hgdpo/photos, never committed)
and their detections, shared by the mask, annotation and metric tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mediapipe_models():
    """The pack's cache folder holding the mediapipe model files, set up there once as
    `python -m trainers models` does (detect() finds them without models_dir); skips when they
    cannot be obtained."""
    from core.masks.model_files import cache_dir
    from trainers.models_setup import ModelsUnavailable, set_up

    try:
        set_up(cache_dir(), log=lambda _: None)
    except ModelsUnavailable as err:
        pytest.skip(f"mediapipe model files unavailable: {err}")
    return cache_dir()


@pytest.fixture(scope="session")
def sample_photos(mediapipe_models):
    """The six face-api demo photos (list of paths), with the model files to detect in them set
    up; skips when npm cannot fetch them."""
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
