"""``python -m trainers annotate`` on a folder of real photos and bad files, as a user runs it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_helpers import run_trainers
from trainers.annotate import is_our_mask, read_caption, write_mask


def annotate(*args):
    return run_trainers("annotate", *args)


def records(folder: Path) -> dict[str, dict]:
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len({r["image"] for r in rows}) == len(rows)  # one record per image
    return {r["image"]: r for r in rows}


@pytest.fixture
def messy_folder(tmp_path, sample_photos):
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    shutil.copyfile(sample_photos[1], data / "sample2.jpg")
    shutil.copyfile(sample_photos[3], data / "more" / "sample4.jpg")
    (data / "sample2.txt").write_text("three women on a sofa", encoding="utf-8")
    (data / "more" / "sample4.txt").write_bytes("quatre filles, été".encode("latin-1"))  # not UTF-8
    whole = sample_photos[4].read_bytes()
    (data / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (data / "notes.png").write_text("this is a text file with an image name\n")
    (data / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (320, 240), (120, 130, 140)).save(data / "wall.png")  # an image without people
    (data / "README.md").write_text("not an image\n")
    # a face mask the user drew for sample4: must be kept and used
    user_mask = data / "masks" / "more" / "sample4_face.png"
    user_mask.parent.mkdir(parents=True)
    with Image.open(data / "more" / "sample4.jpg") as im:
        Image.new("L", im.size, 0).save(user_mask)
    return data


@pytest.mark.slow
def test_annotate_a_messy_folder_then_resume(messy_folder):
    data = messy_folder
    user_mask = data / "masks" / "more" / "sample4_face.png"
    user_bytes = user_mask.read_bytes()

    first = annotate(data, "--workers", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ok 2, no_people 1, error 3, skipped as done 0, not images 1" in first.stdout, first.stdout
    rows = records(data)
    assert set(rows) == {"sample2.jpg", "more/sample4.jpg", "truncated.jpg", "notes.png", "empty.jpg", "wall.png"}

    s2, s4, wall = rows["sample2.jpg"], rows["more/sample4.jpg"], rows["wall.png"]
    assert s2["status"] == "ok" and len(s2["faces"]) == 3 and len(s2["hands"]) >= 2
    assert s2["text"] == "three women on a sofa" and s2["reason"] is None
    assert (s2["width"], s2["height"]) == (1920, 1367)
    assert set(s2["hands"][0]) == {"box", "score", "handedness", "handedness_score"}
    assert s4["status"] == "ok" and "not UTF-8" in s4["reason"] and "user's face mask" in s4["reason"]
    assert s4["text"].startswith("quatre filles")
    assert s4["mask_face"] == "masks/more/sample4_face.png" and user_mask.read_bytes() == user_bytes
    assert wall["status"] == "no_people" and wall["faces"] == [] and wall["hands"] == []
    for name in ("truncated.jpg", "notes.png", "empty.jpg"):
        assert rows[name]["status"] == "error" and rows[name]["reason"].startswith("unreadable image")
        assert rows[name]["mask_face"] is None and rows[name]["mask_hand"] is None

    for row in (s2, s4, wall):
        for key in ("mask_face", "mask_hand"):
            with Image.open(data / row[key]) as mask:
                assert mask.mode == "L" and mask.size == (row["width"], row["height"])
                pixels = np.asarray(mask)
            if row is wall or (row is s4 and key == "mask_face"):
                assert not pixels.any()  # empty masks for no people; the user's (all-black) mask
            else:
                assert pixels.max() == 255
                for found in row["faces" if key == "mask_face" else "hands"]:
                    x0, y0, x1, y1 = (int(v) for v in found["box"])
                    assert pixels[y0:y1, x0:x1].min() == 255
    assert is_our_mask(data / s2["mask_face"]) and not is_our_mask(user_mask)

    # the trainer's reader accepts the result
    from trainers.data import read_records

    assert len(read_records(data)) == 3

    before = (data / "metadata.jsonl").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (data / "masks").rglob("*.png")}
    second = annotate(data, "--workers", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 to do" in second.stdout and "skipped as done 6" in second.stdout
    assert (data / "metadata.jsonl").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in (data / "masks").rglob("*.png")} == stamps


def test_out_folder_and_paths_relative_to_it(tmp_path):
    data, out = tmp_path / "photos", tmp_path / "dataset"
    data.mkdir()
    Image.new("RGB", (64, 48), (200, 200, 200)).save(data / "a.png")
    Image.new("RGB", (64, 48), (10, 10, 10)).save(data / "a.jpg")  # same stem: masks must not collide
    result = annotate(data, "--out", out, "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = records(out)
    assert set(rows) == {"../photos/a.png", "../photos/a.jpg"}
    masks = {rows[k]["mask_face"] for k in rows}
    assert len(masks) == 2 and all((out / m).is_file() for m in masks)
    assert not (data / "metadata.jsonl").exists()
    assert annotate(tmp_path / "missing").returncode == 2


def test_caption_decoding_and_mask_tag(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_bytes("\ufeffa caption\n".encode("utf-8"))
    bad.write_bytes(b"caf\xe9")
    assert read_caption(good) == ("a caption", None)
    text, note = read_caption(bad)
    assert text == "caf\ufffd" and "not UTF-8" in note
    assert read_caption(None) == ("", None)
    write_mask(tmp_path / "m.png", np.ones((4, 5), np.float32))
    assert is_our_mask(tmp_path / "m.png")
    Image.new("L", (5, 4)).save(tmp_path / "user.png")
    assert not is_our_mask(tmp_path / "user.png") and not is_our_mask(good)
