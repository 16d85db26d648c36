import subprocess
import sys
from pathlib import Path

from trainers.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "trainers", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_public_command():
    result = _cli("--help")
    assert result.returncode == 0
    for name in ("annotate", "train", "build-pairs", "sample", "bench", "demo"):
        assert name in COMMANDS and f"  {name}" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = _cli("fly")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_demo_writes_a_png(tmp_path):
    result = _cli("demo", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
