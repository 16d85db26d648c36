import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.weighting import WEIGHTINGS
from trainers.bench import BENCHMARKS
from trainers.cli import COMMANDS
from trainers.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "trainers", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_public_command():
    result = _cli("--help")
    assert result.returncode == 0
    for name in ("annotate", "train", "build-pairs", "sample", "report", "bench", "demo"):
        assert name in COMMANDS and f"  {name}" in result.stdout


def test_help_names_every_method_and_benchmark():
    """The command table is built from the registries: a new method or bench shows up in it."""
    text = " ".join(_cli("--help").stdout.split())  # argparse wraps long lines
    for name in (*METHODS, *BENCHMARKS):
        assert name in text, name


def test_train_help_names_every_method_and_weighting():
    text = " ".join(_cli("train", "--help").stdout.split())
    for name in (*METHODS, *WEIGHTINGS):
        assert name in text, name


def test_every_command_has_a_module():
    from trainers.cli import load_command

    for name in COMMANDS:
        module = load_command(name)
        assert callable(module.add_arguments) and callable(module.run), name


def test_old_flag_spellings_still_parse():
    """Saved scripts use --lr and --grad-accum (TrainConfig's names); the nodes send the same."""
    from trainers.cli import build_parser, load_command

    args = build_parser("train", load_command("train")).parse_args(["--lr", "3e-4", "--grad-accum", "4"])
    assert (args.lr, args.grad_accum) == (3e-4, 4)


def test_unknown_command_is_a_usage_error():
    result = _cli("fly")
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.slow
def test_demo_writes_its_report(tmp_path, sample_photos):
    result = _cli("demo", "--output", str(tmp_path), "--steps", "3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("losses.png", "weights.png", "samples_base_vs_lora.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = json.loads((tmp_path / "report.json").read_text())
    assert Path(report["lora"]).is_file() and Path(report["annotations"]).is_file()
