"""`python -m trainers models` and where core.masks finds the model files.

The wheel tests use the real mediapipe 0.10.21 wheel fetched by the command's own `pip download`
(skipped with the reason when pip reaches no package index); corrupt inputs are made from it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from core.masks import ModelFilesMissing, detect, load_rgb, resolve_model_files
from core.masks import model_files as mf
from core.masks import pose
from trainers import models_setup

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "trainers", "models", *map(str, args)], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The real mediapipe 0.10.21 wheel, as the command downloads it."""
    try:
        return models_setup.download_wheel(tmp_path_factory.mktemp("wheel"))
    except models_setup.ModelsUnavailable as err:
        pytest.skip(f"no package index reachable: {err}")


@pytest.fixture
def no_defaults(tmp_path, monkeypatch):
    """An empty pack cache and no installed 0.10.21: only what a test puts somewhere is found."""
    monkeypatch.setenv("FAIRHUMAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mf, "installed_models_root", lambda: None)
    monkeypatch.setattr(mf, "PACK_ROOT", tmp_path / "pack")
    monkeypatch.delenv(mf.FOLDERS_ENV, raising=False)


def test_set_up_from_the_wheel_then_detect(wheel, tmp_path, sample_photos):
    dest = tmp_path / "models"
    done = _cli("--dest", dest, "--wheel", wheel)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in dest.iterdir())
    assert names == sorted(models_setup.OUTPUTS), names
    assert mf.sha256((dest / mf.WHEEL_FACE_FILE).read_bytes()) == mf.WHEEL_SHA256[mf.WHEEL_FACE]
    assert mf.sha256((dest / mf.WHEEL_HAND_FILE).read_bytes()) == mf.HAND_TASK_SHA256
    assert pose.is_pose_task((dest / pose.WHEEL_POSE_FILE).read_bytes())
    assert not list(dest.glob(".*.tmp"))  # atomic writes leave no temporary behind
    with zipfile.ZipFile(dest / mf.WHEEL_HAND_FILE) as task:
        assert sorted(task.namelist()) == sorted(mf.HAND_TASK_MEMBERS)

    files = resolve_model_files(dest)
    assert (files.face.name, files.hand.name, files.origin) == (mf.WHEEL_FACE_FILE, mf.WHEEL_HAND_FILE, "models folder")
    faces, hands = detect(load_rgb(sample_photos[4]), models_dir=dest)  # sample5: five people
    assert len(faces) == 5 and len(hands) >= 1

    # a second run finds everything in place and writes nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    again = _cli("--dest", dest)
    assert again.returncode == 0 and "checksums match" in again.stdout, again.stdout + again.stderr
    assert stamps == {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}


def test_the_pose_bundle_it_builds_finds_the_people_0_10_21s_writer_found(wheel, tmp_path, sample_photos, no_defaults):
    # Built beside whatever mediapipe this is (1.2.3 here, whose own metadata writer cannot
    # import), found by annotate --pose without any other file, and the same landmarks as the
    # bundle mediapipe 0.10.21's metadata writer made (tests/data, measured once).
    import json

    dest = tmp_path / "models"
    assert _cli("--dest", dest, "--wheel", wheel).returncode == 0
    assert pose.resolve_pose_file(dest) == dest / pose.WHEEL_POSE_FILE
    reference = json.loads(POSE_REFERENCE.read_text())["photos"]
    for path in sample_photos:
        found = pose.detect_pose(load_rgb(path), models_dir=dest, hands=False)
        expected = reference[path.name]
        assert len(found.people) == len(expected), path.name
        for person, want in zip(found.people, expected):
            for xy, seen, ref in zip(person.keypoints, person.visible, want):
                assert seen == (ref is not None), path.name
                if seen:
                    assert np.abs(xy - np.array(ref)).max() <= 1.0, (path.name, xy, ref)


def test_a_damaged_file_is_rewritten_the_others_kept(wheel, tmp_path):
    dest = tmp_path / "models"
    models_setup.set_up(dest, wheel, log=lambda _: None)
    (dest / mf.WHEEL_FACE_FILE).write_bytes(b"truncated")
    kept = (dest / mf.WHEEL_HAND_FILE).stat().st_mtime_ns
    written = models_setup.set_up(dest, wheel, log=lambda _: None)
    assert written == [dest / mf.WHEEL_FACE_FILE]
    assert mf.sha256((dest / mf.WHEEL_FACE_FILE).read_bytes()) == mf.WHEEL_SHA256[mf.WHEEL_FACE]
    assert (dest / mf.WHEEL_HAND_FILE).stat().st_mtime_ns == kept


def test_a_wheel_with_a_changed_model_is_refused(wheel, tmp_path):
    bad = tmp_path / "mediapipe-0.10.21-bad.whl"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for rel in mf.WHEEL_SHA256:
            data = bytearray(src.read(f"mediapipe/{rel}"))
            if rel == mf.WHEEL_PALM:
                data[len(data) // 2] ^= 0xFF
            dst.writestr(f"mediapipe/{rel}", bytes(data))
    dest = tmp_path / "models"
    done = _cli("--dest", dest, "--wheel", bad)
    assert done.returncode == 1
    assert "palm_detection_full.tflite has the wrong SHA-256" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not dest.exists() or not any(dest.iterdir())  # nothing half-done is left

    not_a_wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(not_a_wheel, "w") as dst:
        dst.writestr("mediapipe/__init__.py", "")
    done = _cli("--dest", dest, "--wheel", not_a_wheel)
    assert done.returncode == 1 and "not a mediapipe 0.10.21 wheel" in done.stderr, done.stderr


def test_nothing_obtainable_is_one_error_naming_the_fixes(tmp_path, monkeypatch, no_defaults):
    # pip sees no index at all (and no installed 0.10.21): the error names every way out
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(models_setup.ModelsUnavailable) as err:
        models_setup.set_up(tmp_path / "models", log=lambda _: None)
    message = str(err.value)
    assert "\n" not in message
    for needle in ("no mediapipe 0.10.21 installed", "pip download mediapipe==0.10.21 failed", "--wheel",
                   mf.FACE_FILE, mf.HAND_FILE):
        assert needle in message, message
    assert not (tmp_path / "models").exists()


def test_resolution_order_and_the_error_naming_the_command(tmp_path, no_defaults):
    face, hand = b"face model", b"hand bundle"
    cache = mf.cache_dir()
    with pytest.raises(ModelFilesMissing) as err:
        resolve_model_files(tmp_path / "given")
    message = str(err.value)
    assert "-m trainers models --dest" in message and str(tmp_path / "given") in message and str(cache) in message
    assert mf.FACE_FILE in message and mf.HAND_FILE in message and "\n" not in message
    with pytest.raises(ModelFilesMissing, match=r"-m trainers models`"):  # no folder given: no --dest
        resolve_model_files(None)

    # what `models` writes to the cache is found without a folder ...
    (cache).mkdir(parents=True)
    (cache / mf.WHEEL_FACE_FILE).write_bytes(face)
    (cache / mf.WHEEL_HAND_FILE).write_bytes(hand)
    found = resolve_model_files(None)
    assert (found.face, found.hand, found.origin) == (cache / mf.WHEEL_FACE_FILE, cache / mf.WHEEL_HAND_FILE,
                                                      "default folder")
    # ... a given folder wins, file by file, and an official name beats the wheel's name there
    given = tmp_path / "given"
    given.mkdir()
    (given / mf.WHEEL_HAND_FILE).write_bytes(hand)
    (given / mf.HAND_FILE).write_bytes(hand)
    found = resolve_model_files([tmp_path / "missing", given])
    assert (found.face, found.hand) == (cache / mf.WHEEL_FACE_FILE, given / mf.HAND_FILE)
    assert found.origin == "default folder + models folder"


def test_inside_comfyui_models_go_to_its_models_folder(tmp_path, monkeypatch, no_defaults):
    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    monkeypatch.setattr(mf, "PACK_ROOT", comfy / "custom_nodes" / "fairhuman-hgdpo")
    assert models_setup.default_dest() == comfy / "models" / "mediapipe"
    assert mf.default_folders() == [comfy / "models" / "mediapipe", mf.cache_dir()]
    with pytest.raises(ModelFilesMissing) as err:
        resolve_model_files(comfy / "models" / "mediapipe")  # what the node passes: no --dest needed
    assert "-m trainers models`" in str(err.value) and f"cd {comfy / 'custom_nodes' / 'fairhuman-hgdpo'}" in str(err.value)


def test_folders_from_the_environment_come_first(tmp_path, monkeypatch, no_defaults):
    # the masks node sets this in ComfyUI's process; the trainer processes it starts inherit it
    comfy_a, comfy_b = tmp_path / "a", tmp_path / "b"
    for folder in (comfy_b, mf.cache_dir()):
        folder.mkdir(parents=True)
        (folder / mf.WHEEL_FACE_FILE).write_bytes(b"face")
        (folder / mf.WHEEL_HAND_FILE).write_bytes(b"hand")
    monkeypatch.setenv(mf.FOLDERS_ENV, os.pathsep.join([str(comfy_a), str(comfy_b)]))
    assert mf.default_folders() == [comfy_a, comfy_b, mf.cache_dir()]
    found = resolve_model_files(None)
    assert (found.face.parent, found.hand.parent, found.origin) == (comfy_b, comfy_b, "default folder")
    assert models_setup.default_dest() == comfy_a


def test_installed_0_10_21_is_used_without_setup(tmp_path, monkeypatch):
    root = mf.installed_models_root()
    if root is None:
        pytest.skip("mediapipe 0.10.21 (the one that bundles its models) is not installed here")
    monkeypatch.setenv("FAIRHUMAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mf, "PACK_ROOT", tmp_path / "pack")
    monkeypatch.delenv(mf.FOLDERS_ENV, raising=False)
    found = resolve_model_files(None)
    assert found.face == root / mf.WHEEL_FACE and found.origin == "mediapipe 0.10.21 package"
    assert mf.sha256(found.hand.read_bytes()) == mf.HAND_TASK_SHA256
    assert detect(np.full((64, 64, 3), 90, np.uint8)) == ([], [])


# Tolerance against mediapipe 0.10.21 (the stack before numpy 2): same counts and handedness,
# boxes within 1 px, scores within 0.002. Measured: 1.2.3 within 0.012 px and 7e-5; 0.10.30
# within 0.3 px and 3e-4 (docs/masks.md).
REFERENCE = ROOT / "tests" / "data" / "detections_mediapipe_0.10.21.json"
POSE_REFERENCE = ROOT / "tests" / "data" / "poses_mediapipe_0.10.21_writer.json"


def test_detections_match_mediapipe_0_10_21(sample_photos):
    import json

    import mediapipe

    reference = json.loads(REFERENCE.read_text())["photos"]
    for path in sample_photos:
        faces, hands = detect(load_rgb(path))
        expected = reference[path.name]
        where = f"{path.name} on mediapipe {mediapipe.__version__}"
        assert len(faces) == len(expected["faces"]) and len(hands) == len(expected["hands"]), where
        for found, want in zip(faces + hands, expected["faces"] + expected["hands"]):
            assert np.allclose(found.box, want["box"], atol=1.0), (where, found.box, want["box"])
            assert abs(found.score - want["score"]) <= 0.002, (where, found.score, want["score"])
            assert getattr(found, "handedness", None) == want.get("handedness"), where
