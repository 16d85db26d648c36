"""Evaluation: the comparison metrics checked by hand, and ``python -m trainers evaluate`` end to
end on the tiny SD1.5 model with a FairHuman and an HG-DPO LoRA, its report opened in a real
browser."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.metrics import color_shift, confidence_metrics, hsv_means, win_rate
from train_helpers import make_pairs_folder, make_region_dataset, run_trainers, train_cli

CHROMIUM = Path("/usr/bin/chromium")


def test_hsv_means_of_known_colors():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    gray = np.full((4, 4, 3), 51, np.uint8)  # V = 51/255 = 0.2, S = 0
    blue = np.zeros((4, 4, 3), np.uint8)
    blue[..., 2] = 255  # hue 2/3 of a turn
    assert hsv_means([red]) == pytest.approx((0.0, 1.0, 1.0))
    # two images: the means are over all pixels of both; gray has no hue, so it does not move it
    assert hsv_means([red, gray]) == pytest.approx((0.0, 0.5, 0.6))
    assert hsv_means([blue, gray])[0] == pytest.approx(170 / 255)  # PIL's hue of blue: 170 of 255
    # red (0) and blue (2/3) average to magenta (5/6) around the circle, not to green (1/3)
    assert hsv_means([red, blue])[0] == pytest.approx((0 + 170 / 255 + 1) / 2 % 1, abs=1e-9)


def test_color_shift_is_zero_for_identical_sets_and_positive_under_a_hue_rotation(sample_photos):
    photos = sample_photos[:2]
    same = hsv_means(photos)
    assert color_shift(same, hsv_means(photos)) == {"hue": 0.0, "saturation": 0.0, "value": 0.0, "mean": 0.0}
    rotated = []
    for path in photos:
        hsv = np.asarray(Image.open(path).convert("RGB").convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + 40) % 256  # hue rotated by 40/256 of a turn
        rotated.append(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    shift = color_shift(same, hsv_means(rotated))
    assert shift["hue"] == pytest.approx(40 / 256 * 100, abs=1.0)  # the rotation, in % of a turn
    assert shift["mean"] > 5.0


def test_color_shift_by_hand():
    shift = color_shift((0.5, 0.4, 0.8), (0.55, 0.3, 0.8))
    assert shift["hue"] == pytest.approx(5.0) and shift["saturation"] == pytest.approx(25.0)
    assert shift["value"] == 0.0 and shift["mean"] == pytest.approx(10.0)
    assert color_shift((0.95, 0.5, 0.5), (0.05, 0.5, 0.5))["hue"] == pytest.approx(10.0)  # across 0


def test_win_rate_on_fixed_scores_by_hand():
    a = [0.9, 0.5, None, 0.7, 0.2]
    b = [0.8, 0.5, 0.3, 0.9, 0.1]
    result = win_rate(a, b)  # win, tie, (left out), loss, win
    assert (result.wins, result.ties, result.losses, result.prompts) == (2, 1, 1, 4)
    assert result.rate == 0.625  # (2 + 0.5) / 4
    # Wilson 95% interval for 2.5 of 4, worked by hand: centre 0.5638, half-width 0.3443
    assert result.low == pytest.approx(0.2194, abs=1e-3) and result.high == pytest.approx(0.9081, abs=1e-3)
    flipped = win_rate(b, a)
    assert (flipped.wins, flipped.losses, flipped.rate) == (1, 2, 0.375)
    assert win_rate(a, b, higher_is_better=False).wins == 1


def test_face_confidence_on_a_sample_photo_is_the_mean_of_its_face_scores(sample_detections, sample_photos):
    rgb, faces, hands = sample_detections["sample2.jpg"]
    report = confidence_metrics([rgb], names=["sample2"], tiles=True)  # as sample_detections detects
    assert report.faces == len(faces) >= 3
    assert report.face_confidence == pytest.approx(sum(f.score for f in faces) / len(faces))
    assert hands and report.face_detection_rate == 1.0 and report.hand_detection_rate == 1.0
    assert report.hand_confidence == pytest.approx(sum(h.handedness_score for h in hands) / len(hands))


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    data = make_region_dataset(root / "regions", count=4, size=64)
    common = ["--base", "tiny-sd15", "--resolution", 64, "--steps", 3, "--lr", "1e-2", "--checkpoint-every", 0]
    fair = train_cli("--method", "fairhuman", "--rank", 4, "--data", data, "--output", root / "fh", *common)
    assert fair.returncode == 0, fair.stderr[-2000:]
    pairs = make_pairs_folder(root / "pairs", pairs=2)
    dpo = train_cli("--method", "hg-dpo", "--data", pairs, "--output", root / "dpo", "--eval-pairs", 0, *common)
    assert dpo.returncode == 0, dpo.stderr[-2000:]
    return root / "fh" / "fairhuman_sd15.safetensors", root / "dpo" / "hgdpo_sd15.safetensors"


def evaluate(*args):
    return run_trainers("evaluate", *args)


@pytest.mark.slow
def test_evaluate_writes_a_report_that_a_browser_shows_whole(loras, tmp_path):
    fair, dpo = loras
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a woman\nportrait of a man waving hands\ntwo friends in a park\n"
                       "a child smiling\n")
    out = tmp_path / "eval"
    argv = ["--base", "tiny-sd15", "--lora", f"{fair}:fairhuman", "--lora", f"{dpo}:hgdpo", "--prompts", prompts,
            "--seeds", "0,1", "--strengths", "0.3,0.4,0.5", "--steps", 3, "--size", 64, "--output", out]
    first = evaluate(*argv)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert len(report["images"]) == 4 * 2 + 2 * 3 * 4 * 2
    assert all((out / i["path"]).is_file() for i in report["images"])
    rows = {(r["model"], r["strength"]): r for r in report["rows"]}
    assert rows[("base", None)]["color_shift"]["mean"] == 0.0
    assert set(rows) >= {("fairhuman", 0.3), ("fairhuman", "all"), ("hgdpo", 0.5), ("hgdpo", "all")}
    assert rows[("fairhuman", "all")]["images"] == 24
    pairs = {(w["a"], w["b"], w["metric"]) for w in report["win_rates"]}
    assert ("base", "fairhuman", "face_confidence") in pairs and ("fairhuman", "hgdpo", "hand_confidence") in pairs
    assert "--strengths 0.3,0.4,0.5" in report["command"]

    again = evaluate(*argv)  # resumable: nothing is rendered or detected twice
    assert again.returncode == 0 and "56 already done" in again.stdout
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]

    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: the report was written but not opened in a browser")
    playwright = pytest.importorskip("playwright.sync_api")
    errors, missing = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("requestfailed", lambda r: missing.append(r.url))
        page.goto((out / "report.html").as_uri())
        page.wait_for_load_state("load")
        broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                               ".map(i => i.getAttribute('src').slice(0, 80))")
        count = page.evaluate("document.images.length")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    print(f"screenshot: {shot}")
    assert not errors and not missing and not broken, (errors, missing, broken)
    assert count == len(report["images"]) + 1  # every rendered image and the plot
    assert shot.stat().st_size > 10_000
    if os.environ.get("FAIRHUMAN_SCREENSHOT"):  # for the README: FAIRHUMAN_SCREENSHOT=docs/evaluate_report.png
        Image.open(shot).save(os.environ["FAIRHUMAN_SCREENSHOT"])


def test_evaluate_refuses_bad_inputs_before_loading(loras, tmp_path):
    fair, _ = loras
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo\n")
    missing = evaluate("--lora", tmp_path / "nope.safetensors", "--prompts", prompts, "--output", tmp_path / "o")
    assert missing.returncode != 0 and "no such file" in missing.stderr.strip().splitlines()[-1]
    scorer = evaluate("--lora", fair, "--prompts", prompts, "--scorer", "pickscore", "--output", tmp_path / "o")
    assert scorer.returncode != 0 and "--scorer-model pickscore=FOLDER" in scorer.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()
