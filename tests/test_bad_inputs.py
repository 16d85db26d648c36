"""Every bad input is refused with one clear line, a non-zero exit, and nothing of an earlier run
changed (its LoRA's bytes, checkpoints, config and events identical before and after)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from core.fileio import read_events
from train_helpers import make_pairs_folder, make_region_dataset, train_cli
from trainers.cli import main

pytestmark = pytest.mark.slow

RECIPE = ["--method", "fairhuman", "--base", "tiny-sd15", "--resolution", "64", "--rank", "4", "--lr", "1e-3",
          "--batch-size", "2", "--seed", "0"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_region_dataset(tmp_path_factory.mktemp("regions"), count=4, size=64)


@pytest.fixture(scope="module")
def earlier_run(dataset, tmp_path_factory):
    """A finished 2-step run with a checkpoint and its LoRA: what no bad input may touch."""
    run = tmp_path_factory.mktemp("earlier") / "run"
    result = train_cli(*RECIPE, "--data", dataset, "--output", run, "--steps", 2, "--checkpoint-every", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "fairhuman_sd15.safetensors").is_file() and list((run / "checkpoints").glob("*.pt"))
    return run


def refused(capsys, *argv) -> str:
    """Run a command in this process; it must exit non-zero with one ``error:`` line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0, "the command was not refused"
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_existing_run_without_resume_is_refused(capsys, dataset, earlier_run):
    before = snapshot(earlier_run)
    line = refused(capsys, "train", *RECIPE, "--data", dataset, "--output", earlier_run, "--steps", 2)
    assert "earlier run" in line and "--resume" in line and "--overwrite" in line
    assert "step 2 of 2" in line and "fairhuman_sd15.safetensors" in line
    assert snapshot(earlier_run) == before


def test_resume_with_other_settings_lists_the_differences(capsys, dataset, earlier_run):
    before = snapshot(earlier_run)
    line = refused(capsys, "train", "--resume", "--output", earlier_run, "--rank", 8, "--lr", 1)
    assert "rank: 4 -> 8" in line and "lr: 0.001 -> 1.0" in line and "--overwrite" in line
    assert snapshot(earlier_run) == before


def test_resume_and_overwrite_together_are_refused(capsys, earlier_run):
    before = snapshot(earlier_run)
    line = refused(capsys, "train", "--resume", "--overwrite", "--output", earlier_run)
    assert "contradict" in line
    assert snapshot(earlier_run) == before


def test_resume_below_the_last_checkpoint_is_refused(capsys, earlier_run):
    before = snapshot(earlier_run)
    line = refused(capsys, "train", "--resume", "--output", earlier_run, "--steps", 0)
    assert "--steps 0 is below the run's last checkpoint (step 1)" in line
    assert snapshot(earlier_run) == before


@pytest.mark.parametrize("flags, expected", [
    (["--steps", -3], "--steps -3 must be at least 1"),
    (["--resolution", 0], "--resolution 0 must be a positive multiple of 8"),
    (["--resolution", 100], "--resolution 100 must be a positive multiple of 8"),
    (["--rank", 0], "--rank 0 must be at least 1"),
    (["--lr", 0], "--lr 0.0 must be greater than 0"),
    (["--flip-p", 1.5], "--flip-p 1.5 must be between 0 and 1"),
    (["--batch-size", 0], "--batch-size 0 must be at least 1"),
    (["--grad-accum", 0], "--grad-accum 0 must be at least 1"),
    (["--keep-checkpoints", 0], "--keep-checkpoints 0 must be at least 1"),
    (["--weighting", "fair"], "--weighting 'fair' must be one of"),
    (["--normalization", "none"], "--normalization 'none' must be one of area, reference"),
    (["--mixed-precision", "fp8"], "--mixed-precision 'fp8' must be one of auto, bf16, fp16, no"),
    (["--lora-name", "../x.safetensors"], "must be a plain file name"),
    (["--base", "missing.safetensors"], "--base 'missing.safetensors' is neither"),
])
def test_bad_option_is_refused_even_with_overwrite(capsys, dataset, earlier_run, flags, expected):
    """--overwrite would delete the earlier run; a bad option must be caught before that."""
    before = snapshot(earlier_run)
    line = refused(capsys, "train", *RECIPE, "--data", dataset, "--output", earlier_run, "--overwrite",
                   *flags)
    assert expected in line
    assert snapshot(earlier_run) == before


def test_config_file_values_are_typed(capsys, tmp_path, dataset):
    config = tmp_path / "c.yaml"
    config.write_text("steps: lots\n")
    line = refused(capsys, "train", "--config", config, "--data", dataset, "--output", tmp_path / "r")
    assert "--steps" in line and "lots" in line and not (tmp_path / "r").exists()


def test_missing_image_is_named_before_anything_loads(capsys, dataset, earlier_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "img2.png").unlink()
    (broken / "masks" / "img1_hand.png").write_bytes(b"not a png")
    before = snapshot(earlier_run)
    line = refused(capsys, "train", *RECIPE, "--data", broken, "--output", earlier_run, "--overwrite")
    assert "img2.png (missing)" in line and "img1_hand.png (UnidentifiedImageError)" in line
    assert "annotate" in line
    assert snapshot(earlier_run) == before


def test_resume_with_nothing_to_resume_starts_a_new_run_and_says_so(dataset, tmp_path):
    run = tmp_path / "fresh"
    result = train_cli(*RECIPE, "--data", dataset, "--output", run, "--steps", 1, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    events = read_events(run / "events.jsonl")
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert warnings == [f"nothing to resume in {run}: starting a new run"]
    assert events[-1]["event"] == "done"


def test_overwrite_replaces_the_earlier_run(dataset, earlier_run, tmp_path):
    run = tmp_path / "replaced"
    shutil.copytree(earlier_run, run)
    (run / "notes.txt").write_text("mine")  # not the run's: kept
    result = train_cli(*RECIPE, "--data", dataset, "--output", run, "--steps", 1, "--checkpoint-every", 0,
                       "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    events = read_events(run / "events.jsonl")
    assert [e["event"] for e in events][0] == "start" and sum(e["event"] == "start" for e in events) == 1
    assert not list(run.glob("checkpoints/*.pt"))
    assert json.loads((run / "config.json").read_text())["steps"] == 1
    assert (run / "notes.txt").read_text() == "mine"


def test_torn_last_line_of_pairs_is_ignored(tmp_path):
    pairs = make_pairs_folder(tmp_path / "pairs")
    with open(pairs / "pairs.jsonl", "a") as handle:
        handle.write('{"prompt": "killed mid-wri')  # what a killed build-pairs leaves
    result = train_cli("--method", "hg-dpo", "--base", "tiny-sd15", "--data", pairs, "--output", tmp_path / "run",
                       "--steps", 1, "--resolution", 64, "--eval-pairs", 0)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_events(tmp_path / "run" / "events.jsonl")[-1]["event"] == "done"


def test_bad_line_inside_pairs_is_named_with_file_and_line(capsys, tmp_path):
    pairs = make_pairs_folder(tmp_path / "pairs", pairs=2)
    lines = (pairs / "pairs.jsonl").read_text().splitlines()
    (pairs / "pairs.jsonl").write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    line = refused(capsys, "train", "--method", "hg-dpo", "--base", "tiny-sd15", "--data", pairs, "--output",
                   tmp_path / "run", "--steps", 1, "--resolution", 64)
    assert f"{pairs / 'pairs.jsonl'}:2: not JSON" in line
    assert not (tmp_path / "run").exists()


def test_missing_pair_image_is_named(capsys, tmp_path):
    pairs = make_pairs_folder(tmp_path / "pairs")
    (pairs / "images" / "1_l.png").unlink()
    line = refused(capsys, "train", "--method", "hg-dpo", "--base", "tiny-sd15", "--data", pairs, "--output",
                   tmp_path / "run", "--steps", 1, "--resolution", 64)
    assert "1_l.png (missing)" in line


def test_sample_with_a_lora_of_another_architecture_names_both(capsys, earlier_run, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--base", "tiny-sdxl", "--lora", str(earlier_run / "fairhuman_sd15.safetensors"),
              "--prompt", "a photo", "--steps", "1", "--output", str(tmp_path / "s")])
    message = str(exit_info.value.code)
    assert message.count("\n") == 0
    assert "is a LoRA for sd15" in message and "is sdxl" in message


def test_a_run_saved_under_the_former_option_name_resumes_with_its_file_name(dataset, earlier_run, tmp_path):
    """``lora_name`` became ``output_file`` (it names a ControlNet's file too): a run folder whose
    config.json says ``lora_name``, and the ``--lora-name`` flag, keep working."""
    run = tmp_path / "former"
    shutil.copytree(earlier_run, run)
    saved = json.loads((run / "config.json").read_text())
    saved["lora_name"] = saved.pop("output_file") or "kept name.safetensors"
    (run / "config.json").write_text(json.dumps(saved))
    result = train_cli("--resume", "--output", run, "--steps", 3, "--checkpoint-every", 0)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "kept name.safetensors").is_file()
    assert json.loads((run / "config.json").read_text())["output_file"] == "kept name.safetensors"

    renamed = tmp_path / "flag"
    result = train_cli(*RECIPE, "--data", dataset, "--output", renamed, "--steps", 1, "--checkpoint-every", 0,
                       "--lora-name", "by former flag.safetensors")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (renamed / "by former flag.safetensors").is_file()
