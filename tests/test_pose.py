"""annotate --pose on real photos: a skeleton per detected person, counted in the render; the
pose model file's resolution and its error; a user's own condition image is kept."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_helpers import run_trainers

pytestmark = pytest.mark.slow


def annotate(*args):
    return run_trainers("annotate", *args, "--workers", 1)


def drawn(render: np.ndarray, a, b, color) -> bool:
    """Whether the middle of segment a-b carries the limb's colour (ends are under the joints)."""
    for t in np.linspace(0.35, 0.65, 7):
        x, y = np.round(a + (b - a) * t).astype(int)
        patch = render[max(y - 1, 0): y + 2, max(x - 1, 0): x + 2].reshape(-1, 3)
        if (patch == np.array(color, np.uint8)).all(axis=1).any():
            return True
    return False


@pytest.fixture(scope="module")
def annotated(sample_photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("posed")
    for path in sample_photos:
        shutil.copy(path, folder / path.name)
    result = annotate(folder, "--pose")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_every_detected_person_gets_a_skeleton_and_every_limb_is_drawn(annotated):
    from core.masks import load_rgb
    from core.masks.pose import COLORS, LIMBS, detect_pose

    rows = [json.loads(line) for line in (annotated / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    people = 0
    for row in rows:
        render = np.asarray(Image.open(annotated / row["condition"]).convert("RGB"))
        assert render.shape[:2] == (row["height"], row["width"])
        pose = detect_pose(load_rgb(annotated / row["image"]))  # IMAGE mode: the same result again
        assert pose.to_json() == row["pose"]
        assert row["pose"]["people"] >= 2, row  # every sample photo shows a group
        for person in pose.people:
            assert len(person.limbs) >= 8, (row["image"], person.limbs)  # a skeleton, not a stray point
            found = [i for i in person.limbs
                     if drawn(render, person.keypoints[LIMBS[i][0]], person.keypoints[LIMBS[i][1]], COLORS[i])]
            assert len(found) >= len(person.limbs) - 1, (row["image"], person.limbs, found)
            people += 1
    assert people >= 12
    # black where nothing is drawn: most of the image
    assert (render.sum(axis=2) == 0).mean() > 0.8


def test_a_users_own_condition_image_is_kept_and_recorded(tmp_path, sample_photos):
    shutil.copy(sample_photos[0], tmp_path / "a.jpg")
    (tmp_path / "masks").mkdir()
    own = np.full((40, 60, 3), 77, np.uint8)  # a depth map of another size: resized at training time
    Image.fromarray(own).save(tmp_path / "masks" / "a_condition.png")
    before = (tmp_path / "masks" / "a_condition.png").read_bytes()
    result = annotate(tmp_path, "--pose")
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((tmp_path / "metadata.jsonl").read_text())
    assert row["condition"] == "masks/a_condition.png" and "pose" not in row
    assert "kept the user's condition image" in row["reason"]
    assert (tmp_path / "masks" / "a_condition.png").read_bytes() == before


def test_missing_pose_model_names_the_file_and_the_command(tmp_path, monkeypatch):
    from core.masks import ModelFilesMissing
    from core.masks import model_files as mf
    from core.masks.pose import POSE_FILE, resolve_pose_file

    monkeypatch.setenv("FAIRHUMAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mf, "installed_models_root", lambda: None)  # a mediapipe without bundled models
    with pytest.raises(ModelFilesMissing) as err:
        resolve_pose_file(tmp_path / "empty")
    message = str(err.value)
    assert POSE_FILE in message and "-m trainers models" in message and str(tmp_path / "empty") in message


def test_tflite_metadata_is_added_replaced_and_read_back():
    # the writer the pose bundle is built with, on a real tflite model (the face detector that
    # `trainers models` sets up); what the Tasks API reads back is what was written
    from core.masks import model_files as mf
    from core.masks import resolve_model_files
    from core.masks.tflite_metadata import METADATA_NAME, read_image_normalization, with_image_metadata
    from mediapipe.tasks.metadata import schema_py_generated as model_fb

    model = resolve_model_files().face.read_bytes()
    once = with_image_metadata(model, name="face", mean=127.5, std=127.5)
    assert read_image_normalization(once) == (127.5, 127.5)
    assert with_image_metadata(model, name="face", mean=127.5, std=127.5) == once  # deterministic
    twice = with_image_metadata(once, name="face", mean=0.0, std=255.0)
    assert read_image_normalization(twice) == (0.0, 255.0)
    root = model_fb.Model.GetRootAsModel(twice, 0)
    names = [root.Metadata(i).Name() for i in range(root.MetadataLength())]
    assert names.count(METADATA_NAME) == 1  # replaced, not added beside the first
    # the model itself is untouched: same operators, same weights
    before, after = model_fb.Model.GetRootAsModel(model, 0), root
    assert before.Subgraphs(0).OperatorsLength() == after.Subgraphs(0).OperatorsLength()
    weights = [before.Buffers(i).DataAsNumpy() for i in range(before.BuffersLength())]
    assert all(isinstance(w, int) or np.array_equal(w, after.Buffers(i).DataAsNumpy()) for i, w in enumerate(weights))
    with pytest.raises(ValueError, match="not a tflite model"):
        with_image_metadata(b"PK\x03\x04 a zip, not a model", name="x", mean=0.0, std=1.0)
    assert mf.sha256(model) == mf.WHEEL_SHA256[mf.WHEEL_FACE]  # the test really used the wheel's file


def test_annotating_elsewhere_uses_the_folders_own_condition_and_never_its_masks_as_photos(tmp_path, sample_photos):
    # `--out` elsewhere (what the training nodes do): the folder's masks/ holds the user's
    # condition (used, not copied) and is never read as photos
    photos = tmp_path / "photos"
    (photos / "masks").mkdir(parents=True)
    shutil.copy(sample_photos[0], photos / "a.jpg")
    Image.fromarray(np.full((40, 60, 3), 77, np.uint8)).save(photos / "masks" / "a_condition.png")
    out = tmp_path / "out"
    result = annotate(photos, "--out", out, "--pose")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["a.jpg"]
    assert (out / rows[0]["condition"]).resolve() == (photos / "masks" / "a_condition.png").resolve()
    assert "pose" not in rows[0] and (out / rows[0]["mask_face"]).is_file()
