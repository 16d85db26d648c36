"""``--preset paper``: one source (trainers/presets.py) that the configuration resolves from and
the documentation's table is rendered from (trainers/preset_table.py); a test per preset value;
precedence; recorded in the run."""
import json
import re
import subprocess
import sys

import pytest
from test_paper_fidelity import pairs_folder
from train_helpers import ROOT, offline_env, train_cli

from trainers.preset_table import format_value, markdown_table
from trainers.presets import PAPER, PRESETS

# the table lives between these markers in the README or in one of docs/*.md
MARKERS = re.compile(r"<!-- presets:begin -->\n(.*?)\n<!-- presets:end -->", re.DOTALL)
CASES = [(command, setting) for command, settings in PRESETS[PAPER].items() for setting in settings]


def _readme_table() -> str:
    tables = [found.group(1) for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
              for found in MARKERS.finditer(path.read_text(encoding="utf-8"))]
    assert len(tables) == 1, f"expected one presets table (<!-- presets:begin -->) in README or docs/: {len(tables)}"
    return tables[0]


def _readme_rows() -> dict:
    """{(command, option): (default, preset)} from the README's table."""
    rows = {}
    for line in _readme_table().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        command = cells[0].removeprefix("train --method ")
        rows[(command, cells[1].strip("`").removeprefix("--").replace("-", "_"))] = (cells[2], cells[3])
    return rows


def _train_config(*argv):
    from trainers.cli import build_parser, load_command
    from trainers.config import resolve
    from trainers.methods import method_module

    args = build_parser("train", load_command("train")).parse_args(list(argv))
    method = args.method or "fairhuman"
    return resolve(args, method_module(method).METHOD.defaults)


def _build_pairs_options(*argv):
    from trainers.build_pairs import resolve_options
    from trainers.cli import build_parser, load_command

    parser = build_parser("build-pairs", load_command("build-pairs"))
    return resolve_options(parser.parse_args(["--prompts", "p.txt", "--output", "out", *argv]))


def _resolved(command, preset: bool):
    flags = ["--preset", PAPER] if preset else []
    if command == "build-pairs":
        return vars(_build_pairs_options(*flags))
    return _train_config("--method", command, *flags).to_dict()


def test_the_readme_table_is_the_rendered_presets():
    assert _readme_table() == markdown_table()


@pytest.mark.parametrize("command,setting", CASES, ids=[f"{c}-{s.option}" for c, s in CASES])
def test_each_preset_value_resolves_to_what_the_readme_says(command, setting):
    default_cell, preset_cell = _readme_rows()[(command, setting.option)]
    resolved = _resolved(command, preset=True)[setting.option]
    assert resolved == setting.paper
    assert format_value(resolved) == preset_cell
    default = _resolved(command, preset=False)[setting.option]
    assert default_cell == (setting.default_text or format_value(default))


def test_the_paper_presets_key_values():
    # the list, written out by hand: a wrong table entry fails here too
    hg = _train_config("--method", "hg-dpo", "--preset", PAPER)
    assert (hg.rank, hg.lr, hg.beta, hg.lambda_stat, hg.stat_reduction, hg.batch_size * hg.grad_accum) == (
        8, 1e-5, 2500.0, 10000.0, "squared-norm", 16)
    fh = _train_config("--method", "fairhuman", "--preset", PAPER)
    assert (fh.rank, fh.lr, fh.resolution, fh.batch_size, fh.local_scale, fh.normalization) == (
        256, 1e-5, 1024, 1, 1.0, "reference")
    bp = _build_pairs_options("--preset", PAPER)
    assert (bp.scorer, bp.n, bp.sampler, bp.steps, bp.cfg) == ("pickscore", 20, "dpmsolver++", 50, 5.0)


def test_flags_and_the_config_file_win_over_the_preset(tmp_path):
    cfg = _train_config("--method", "hg-dpo", "--preset", PAPER, "--grad-accum", "2")
    assert cfg.grad_accum == 2 and cfg.rank == 8 and cfg.preset == PAPER
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"rank": 4}))
    assert _train_config("--method", "hg-dpo", "--preset", PAPER, "--config", str(config)).rank == 4
    config.write_text(json.dumps({"preset": PAPER}))  # the preset itself may come from the file
    assert _train_config("--method", "hg-dpo", "--config", str(config)).grad_accum == 16
    assert _build_pairs_options("--preset", PAPER, "--steps", "7").steps == 7
    # without a preset nothing changes
    plain = _train_config("--method", "hg-dpo")
    assert (plain.preset, plain.grad_accum, plain.stat_reduction) == ("", 1, "channel-mean")


def test_an_unknown_preset_is_refused_before_anything_loads(tmp_path):
    result = train_cli("--method", "hg-dpo", "--preset", "papr", "--base", "tiny-sd15",
                       "--data", pairs_folder(tmp_path / "pairs", 64, 64), "--output", tmp_path / "run")
    assert result.returncode == 2
    assert "--preset 'papr' is unknown; expected one of paper" in result.stderr
    assert not (tmp_path / "run").exists()


def test_build_pairs_preset_without_a_pickscore_folder_names_the_flag(tmp_path):
    (tmp_path / "prompts.txt").write_text("a person waving\n")
    result = subprocess.run([sys.executable, "-m", "trainers", "build-pairs", "--base", "tiny-sd15", "--preset",
                             PAPER, "--prompts", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "out")],
                            cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--scorer-model pickscore=FOLDER" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before any generation


def test_the_preset_is_recorded_in_the_run_and_the_lora(tmp_path):
    from core.lora_format import read_lora_metadata

    run = tmp_path / "run"
    # the paper's recipe, shortened for a CPU: one step of one pair, AdamW
    result = train_cli("--method", "hg-dpo", "--preset", PAPER, "--base", "tiny-sd15", "--data",
                       pairs_folder(tmp_path / "pairs", 64, 64), "--output", run, "--steps", 1, "--grad-accum", 1,
                       "--optimizer", "adamw", "--eval-pairs", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] == PAPER and saved["stat_reduction"] == "squared-norm" and saved["rank"] == 8
    metadata = read_lora_metadata(next(run.glob("*.safetensors")))
    assert metadata["fairhuman.preset"] == PAPER and metadata["fairhuman.stat_reduction"] == "squared-norm"


def test_the_paper_sampler_is_dpm_solver_pp_on_the_models_own_schedule():
    from diffusers import DPMSolverMultistepScheduler

    from core.tiny_models import build_tiny_pipeline
    from trainers.build_pairs import use_sampler

    pipe = build_tiny_pipeline("tiny-sd15")
    before = dict(pipe.scheduler.config)
    use_sampler(pipe, "dpmsolver++")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert pipe.scheduler.config[key] == before[key], key
    kept = type(pipe.scheduler)
    use_sampler(pipe, "default")  # the model's own: nothing swapped
    assert type(pipe.scheduler) is kept


def test_build_pairs_size_takes_a_side_or_width_x_height():
    import argparse

    from trainers.build_pairs import image_size

    assert image_size("512") == (512, 512) and image_size("704x1024") == (704, 1024)
    for bad in ("700x1024", "0", "axb", "64x64x64"):
        with pytest.raises(argparse.ArgumentTypeError):
            image_size(bad)


@pytest.mark.slow
def test_build_pairs_with_the_paper_preset_records_how_it_generated(tmp_path):
    from PIL import Image

    (tmp_path / "prompts.txt").write_text("a person waving\n")
    result = subprocess.run([sys.executable, "-m", "trainers", "build-pairs", "--base", "tiny-sd15", "--preset", PAPER,
                             "--scorer", "anatomy", "--n", "2", "--steps", "2", "--size", "64x96", "--prompts",
                             str(tmp_path / "prompts.txt"), "--output", str(tmp_path)],
                            cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    assert record["generation"] == {"sampler": "dpmsolver++", "steps": 2, "cfg": 5.0, "scorer": "anatomy",
                                    "preset": PAPER}
    with Image.open(tmp_path / record["images"][0]) as im:
        assert im.size == (64, 96)
