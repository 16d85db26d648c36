import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.cli import COMMANDS

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
