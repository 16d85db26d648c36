"""FairHuman on every flow-transformer family (tiny-flux, tiny-sd3, tiny-zimage), the parts that
are the same for each: exact MPD lowers all three losses, a run SIGKILLed at a checkpoint resumes
to the same LoRA bit for bit, a family that cannot render yet says so before its first step, and
`bench fairhuman --base` measures it. What differs per family is in test_flux.py, test_sd3.py and
test_zimage.py."""
from __future__ import annotations

import pytest

from flow_helpers import assert_mpd_training_lowers_all_three_losses, fairhuman_args
from train_helpers import assert_killed_run_resumes_exactly, run_trainers, train_cli

FLOW_BASES = ["tiny-flux", "tiny-sd3", "tiny-zimage"]


# slow (they train; 10-40 s each on two cores): CI keeps each family's fast checks (its masks, keys,
# conditioning) and the refusal below; make test-all runs these
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


@pytest.mark.parametrize("base", ["tiny-sd3", "tiny-zimage"])
def test_rendering_is_refused_with_a_message_not_attempted(base, region_dataset_64, tmp_path):
    """Their pipeline calls are not tested yet: a run asking for validation images stops before its
    first step saying what to set, and ``sample`` and ``build-pairs`` say they cannot render, never
    a half-made image."""
    arch = base.removeprefix("tiny-")
    result = train_cli(*fairhuman_args(base), "--data", region_dataset_64, "--output", tmp_path / "run", "--steps", 2,
                       "--validate-every", 1)
    assert result.returncode == 1 and f"cannot render {arch} images yet" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not list((tmp_path / "run").glob("*.safetensors"))
    sample = run_trainers("sample", "--base", base, "--prompt", "a person", "--steps", 1, "--size", 64,
                          "--output", tmp_path / "sample")
    assert sample.returncode != 0 and f"cannot render {arch} images yet" in sample.stderr
    assert not list((tmp_path / "sample").glob("*.png"))
    (tmp_path / "prompts.txt").write_text("a person waving\n")
    pairs = run_trainers("build-pairs", "--base", base, "--prompts", tmp_path / "prompts.txt", "--images-per-prompt", 2,
                         "--steps", 1, "--size", 64, "--output", tmp_path / "pairs")
    assert pairs.returncode != 0 and f"cannot render {arch} images yet" in pairs.stderr
    assert not list((tmp_path / "pairs").rglob("*.png"))


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

