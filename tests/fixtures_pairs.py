"""One build-pairs output on the tiny SD1.5 for the whole session, shared by the HG-DPO and the
Fair DPO tests (which only read it): generating and scoring 32 images is their largest cost."""
from __future__ import annotations

import pytest

PROMPTS = ["a photo of a woman waving hands", "two friends holding hands", "a portrait of a smiling man",
           "a child waving", "a group of people in a park", "a woman holding a cup", "close up of hands",
           "a man sitting in a studio"]

# Tiny tensors: one thread is as fast, and on a loaded machine OpenMP's spinning threads are not.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory):
    """The issue's setting: N = 4 images for each of 8 prompts, anatomy scorer; the tiny model's
    samples hold no face a detector is sure of, so the kept images' masks come from detections
    of confidence ≥ 0.1."""
    from train_helpers import run_trainers

    folder = tmp_path_factory.mktemp("pairs")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS))
    result = run_trainers("build-pairs", "--base", "tiny-sd15", "--prompts", folder / "prompts.txt", "--n", 4,
                          "--output", folder, "--steps", 2, "--size", 64, "--scorer", "anatomy",
                          "--mask-confidence", 0.1, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder
