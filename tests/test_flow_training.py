"""FairHuman on every flow-transformer family (tiny-flux, tiny-sd3, tiny-zimage), the parts that
are the same for each: exact MPD lowers all three losses, a run SIGKILLed at a checkpoint resumes
to the same LoRA bit for bit, training renders samples and its LoRA samples and evaluates, and
`bench fairhuman --base` measures it. What differs per family is in test_flux.py, test_sd3.py and
test_zimage.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flow_helpers import assert_mpd_training_lowers_all_three_losses, fairhuman_args
from train_helpers import assert_killed_run_resumes_exactly, run_trainers, train_cli

FLOW_BASES = ["tiny-flux", "tiny-sd3", "tiny-zimage"]


# slow (they train; 10-40 s each on two cores): CI keeps each family's fast checks (its masks, keys,
# conditioning, decoding); make test-all runs these
@pytest.mark.slow
@pytest.mark.parametrize("base", FLOW_BASES)
def test_mpd_training_lowers_all_three_losses(base, region_dataset_64, tmp_path):
    assert_mpd_training_lowers_all_three_losses(base, region_dataset_64, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("base", FLOW_BASES)
def test_sigkill_then_resume_equals_uninterrupted(base, region_dataset_64, tmp_path):
    args = [*fairhuman_args(base), "--batch-size", 2, "--steps", 12, "--checkpoint-every", 4,
            "--data", region_dataset_64]
    assert_killed_run_resumes_exactly(args, tmp_path, kill_at=8)


@pytest.mark.slow
@pytest.mark.parametrize("base", FLOW_BASES)
def test_training_renders_and_its_lora_samples_and_evaluates(base, region_dataset_64, tmp_path):
    """Every rendering path runs through the family's own pipeline: --sample-every and
    --validate-every write images of the training size that are not flat; ``sample --lora`` reads
    the LoRA the run wrote back (its image differs from the base's, with --lan too) and refuses a
    UNet LoRA naming both architectures; ``evaluate`` renders the base and the LoRA. (That each
    family decodes as its pipeline does: test_flux.py, test_sd3.py, test_zimage.py.)"""
    from core.fileio import read_events

    arch = base.removeprefix("tiny-")
    run = tmp_path / "run"
    result = train_cli(*fairhuman_args(base), "--data", region_dataset_64, "--output", run, "--steps", 2,
                       "--sample-every", 2, "--sample-prompts", "a photo of hands", "--sample-steps", 2,
                       "--validate-every", 2, "--validation-prompts", "a person waving", "--validation-seeds", 1,
                       "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = read_events(run / "events.jsonl")
    paths = [p for e in events if e["event"] in ("sample", "validation") for p in e["paths"]]
    assert len(paths) == 2 and {e["event"] for e in events} >= {"sample", "validation"}
    for path in paths:
        assert_image(path, (64, 64))
    lora = run / f"fairhuman_{arch}_best.safetensors"
    assert lora.is_file()

    common = ["sample", "--base", base, "--prompt", "a photo of hands", "--steps", 2, "--size", 64, "--cfg", 2]
    outputs = {}
    for name, extra in {"plain": [], "lora": ["--lora", lora], "lan": ["--lora", lora, "--lan"]}.items():
        done = run_trainers(*common, *extra, "--output", tmp_path / name)
        assert done.returncode == 0, done.stderr[-3000:]
        (outputs[name],) = (tmp_path / name).glob("*.png")
    plain = assert_image(outputs["plain"], (64, 64))
    assert np.abs(plain - assert_image(outputs["lora"], (64, 64))).max() > 0
    assert np.abs(plain - assert_image(outputs["lan"], (64, 64))).max() > 0  # LAN matches statistics, not images

    unet_lora = tmp_path / "unet_lora.safetensors"  # another trainer's: no metadata, lora_unet_ keys
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(unet_lora))
    refused = run_trainers(*common, "--lora", unet_lora, "--output", tmp_path / "bad")
    assert refused.returncode != 0
    assert "is a LoRA for sd15/sdxl" in refused.stderr and f"is {arch}" in refused.stderr

    (tmp_path / "prompts.txt").write_text("a person waving hands\n")
    evaluated = run_trainers("evaluate", "--base", base, "--lora", f"{lora}:tuned", "--prompts", tmp_path / "prompts.txt",
                             "--seeds", 0, "--strengths", 1.0, "--steps", 2, "--size", 64, "--output", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    images = {i["model"]: tmp_path / "eval" / i["path"]
              for i in json.loads((tmp_path / "eval" / "report.json").read_text())["images"]}
    assert set(images) == {"base", "tuned"}
    assert np.abs(assert_image(images["base"], (64, 64)) - assert_image(images["tuned"], (64, 64))).max() > 0


def assert_image(path, size) -> np.ndarray:
    """The pixels of an image of ``size`` that is not flat (a wrong decode would still be an image,
    seldom a flat one; equality with the pipeline's own decode is each family's test)."""
    with Image.open(path) as image:
        assert image.size == size
        pixels = np.asarray(image, dtype=int)
    assert pixels.std() > 1
    return pixels


@pytest.mark.slow
@pytest.mark.parametrize("base", FLOW_BASES)
def test_bench_fairhuman_measures_the_flow_transformers(base):
    """`bench fairhuman --base` times the same steps on a flow transformer through its family (its
    objective, its LoRA targets): every row of the table, and the MPD-against-floor line."""
    result = run_trainers("bench", "fairhuman", "--base", base, "--ranks", 4, "--steps", 1, "--latent", 8,
                          "--fair-every", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith(f"{base} (") and "transformer" in out.splitlines()[0]
    rows = [line.split("|")[3].strip() for line in out.splitlines() if line.startswith("| 4 |")]
    assert rows[:6] == ["plain", "floor", "batched", "mpd", "mpd-loop", "reference"], rows
    assert "**mpd / floor**" in out and "| 4 | 2 |" in out  # the fair-every 2 row of the amortized table

