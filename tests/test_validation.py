"""``--validate-every``: validation events, the best LoRA kept by face and hand quality, exactly the
same best after a SIGKILL and a resume, and the validation curve in ``report``."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from core.fileio import EventLog, read_events
from core.lora_format import read_lora_metadata, save_lora
from train_helpers import ROOT, lora_tensors, make_region_dataset, offline_env

pytestmark = pytest.mark.slow

# one CPU thread: a killed-and-resumed run must equal the uninterrupted one bit for bit
ENV = dict(offline_env(), OMP_NUM_THREADS="1")
TRAIN = ["--method", "fairhuman", "--base", "tiny-sd15", "--resolution", "64", "--rank", "4", "--lr", "1e-2",
         "--batch-size", "2", "--seed", "0", "--steps", "8", "--checkpoint-every", "4", "--validate-every", "4",
         "--validation-prompts", "a photo of a person waving", "--validation-seeds", "1", "--sample-steps", "2"]
LORA, BEST = "fairhuman_sd15.safetensors", "fairhuman_sd15_best.safetensors"


def train(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainers", "train", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)


def validations(run_dir) -> list[dict]:
    return [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "validation"]


# ---- the validator on real photos: scores, the best kept, and kept across a new process ------
def photo_renders(sample_photos, names=("sample2.jpg", "sample4.jpg"), side=512):
    images = []
    for path in sample_photos:
        if path.name in names:
            with Image.open(path) as photo:
                image = photo.convert("RGB")
                image.thumbnail((side, side))
                images.append(image)
    return images


def test_validator_scores_face_and_hand_and_keeps_the_best(sample_photos, tmp_path):
    """A 'training run' whose renders are noise (step 1), real photos (steps 2 and 3: a tie) and
    one photo beside noise (step 4): the kept file is step 2's, a validator started afresh (a
    resumed process) keeps it, and the scores are the pack's Face/Hand Confi. of the images."""
    from core.metrics import image_scores
    from trainers.config import TrainConfig
    from trainers.validation import Validator, read_best

    photos = photo_renders(sample_photos)
    noise = Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8))
    renders = {1: [noise, noise], 2: photos, 3: photos, 4: [photos[0], noise], 5: [photos[0], noise]}
    cfg = TrainConfig(validate_every=1, validation_prompts=["a group of people"], validation_seeds=2,
                      validation_scorer="anatomy")
    events = EventLog(tmp_path / "events.jsonl", echo=False)
    state = {"step": 0}

    def export(path, metadata):  # a real LoRA file whose tensors say which step it was
        step = state["step"]
        save_lora(path, {"unet.mid_block.attn.to_q.lora_A.weight": torch.full((2, 4), float(step)),
                         "unet.mid_block.attn.to_q.lora_B.weight": torch.zeros(4, 2)}, metadata=metadata, alpha=2.0)

    def run(validator, step):
        state["step"] = step
        return validator(step)

    validator = Validator(cfg, tmp_path, events, LORA, lambda pairs: renders[state["step"]][:len(pairs)], export)
    records = [run(validator, step) for step in (1, 2, 3, 4)]
    assert [r["improved"] for r in records] == [True, True, False, False]

    # the face-hand score: per image (mean face score + mean handedness) / 2, 0 where none is found
    per_image = [image_scores(image) for image in photos]
    assert all(s.face_scores for s in per_image) and any(s.hand_scores for s in per_image)
    expected = np.mean([(np.mean(s.face_scores or [0]) + np.mean(s.hand_scores or [0])) / 2 for s in per_image])
    assert records[1]["score"] == pytest.approx(expected, abs=1e-9) and records[1]["score"] > 0
    assert records[0]["score"] == 0.0 and 0 < records[3]["score"] < records[1]["score"]
    assert records[1]["face_confidence"] > 0.5 and records[1]["face_detection_rate"] == 1.0
    assert records[1]["scores"]["scorer"] > records[0]["scores"]["scorer"]  # the anatomy scorer beside them
    assert records[3]["best_step"] == 2 and records[3]["best_score"] == records[1]["score"]

    best = tmp_path / BEST
    meta = read_lora_metadata(best)
    assert meta["fairhuman.validation_step"] == 2 and meta["fairhuman.validation_metric"] == "face-hand"
    assert meta["fairhuman.validation_score"] == records[1]["score"]
    assert read_best(best) == (2, records[1]["score"])
    assert float(lora_tensors(best)["lora_unet_mid_block_attn_to_q.lora_down.weight"].max()) == 2.0

    again = Validator(cfg, tmp_path, events, LORA, lambda pairs: renders[state["step"]][:len(pairs)], export)
    assert run(again, 5)["improved"] is False and read_best(best) == (2, records[1]["score"])


# ---- end to end: the trainer on the tiny model -------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_region_dataset(tmp_path_factory.mktemp("regions"), size=64)


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory, mediapipe_models):
    run_dir = tmp_path_factory.mktemp("straight")
    result = train(*TRAIN, "--data", dataset, "--output", run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_validation_events_and_the_best_file(straight):
    found = validations(straight)
    assert [e["step"] for e in found] == [4, 8]
    for event in found:
        assert event["metric"] == "face-hand" and event["score"] == event["scores"]["face-hand"]
        assert {"face", "hand", "face-hand"} <= set(event["scores"]) and event["images"] == 1
        assert event["best_path"] == str(straight / BEST)
    # tiny-model renders hold no face: every score is 0, and a tie keeps the earlier step
    assert found[-1]["best_step"] == 4 and found[-1]["best_score"] == 0.0
    meta = read_lora_metadata(straight / BEST)
    assert meta["fairhuman.validation_step"] == 4 and meta["fairhuman.steps"] == 4
    assert meta["fairhuman.base_arch"] == "sd15" and meta["fairhuman.method"] == "fairhuman"
    assert lora_tensors(straight / BEST).keys() == lora_tensors(straight / LORA).keys()


def kill_when(argv, run_dir, ready):
    proc = subprocess.Popen([sys.executable, "-m", "trainers", "train", *map(str, argv)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not ready(read_events(run_dir / "events.jsonl")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("moment", ["after-validation", "before-validation"])
def test_sigkill_and_resume_keep_the_same_best(straight, dataset, tmp_path, moment):
    """Killed just after the step-4 validation (the resumed run must compare against the kept
    best, or the tie at step 8 would replace it), or between the step-4 checkpoint and its
    validation (the resumed run must redo that validation, or step 8 would be the best)."""
    if moment == "after-validation":
        def ready(events):
            return any(e["event"] == "validation" for e in events)
    else:
        def ready(events):
            return any(e["event"] == "checkpoint" and e["step"] == 4 for e in events)
    argv = [*TRAIN, "--data", dataset, "--output", tmp_path]
    kill_when(argv, tmp_path, ready)
    assert not (tmp_path / LORA).exists(), "killed too late: the run had finished"
    done_before = [e["step"] for e in validations(tmp_path)]
    assert done_before == ([4] if moment == "after-validation" else []), f"killed at the wrong moment: {done_before}"

    resumed = train(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    redone = [e["step"] for e in validations(tmp_path)][len(done_before):]
    assert redone == ([4, 8] if moment == "before-validation" else [8])  # step 4 again only where it was cut short
    final = validations(tmp_path)[-1]
    expected = validations(straight)[-1]
    assert (final["step"], final["best_step"], final["best_score"]) == (8, expected["best_step"], expected["best_score"])
    assert read_lora_metadata(tmp_path / BEST)["fairhuman.validation_step"] == expected["best_step"]
    for name in (BEST, LORA):  # the kept best and the final LoRA, bit for bit
        a, b = lora_tensors(straight / name), lora_tensors(tmp_path / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_report_plots_the_validation_curve(straight, tmp_path):
    from trainers.report import plot_run

    written = plot_run(straight / "events.jsonl", tmp_path)
    assert tmp_path / "validation.png" in written
    with Image.open(tmp_path / "validation.png") as image:
        assert image.width > 300 and image.height > 200


def test_validation_options_are_checked_before_anything_loads(dataset):
    from trainers.config import ConfigError, TrainConfig, validate

    def problem(**options):
        with pytest.raises(ConfigError) as err:
            validate(TrainConfig(data=str(dataset), **options))
        return str(err.value)

    assert "trains a ControlNet" in problem(method="fairhuman-controlnet", validate_every=10)
    assert "needs --validation-scorer" in problem(validate_every=10, validation_metric="scorer")
    assert "needs its weights folder" in problem(validate_every=10, validation_scorer="hps")
    assert "must be one of" in problem(validate_every=10, validation_metric="fid")
    validate(TrainConfig(data=str(dataset), validate_every=10, validation_scorer="anatomy", validation_metric="scorer"))
