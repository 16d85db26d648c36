"""``bench fairness`` in its --smoke size, so the benchmark cannot rot: it annotates the real
photos, trains with two weightings and prints every region's held-out reduction."""
import re
import subprocess
import sys

import pytest

from train_helpers import ROOT, offline_env

pytestmark = pytest.mark.slow


def test_bench_fairness_smoke(sample_photos):
    result = subprocess.run([sys.executable, "-m", "trainers", "bench", "fairness", "--smoke"], cwd=ROOT,
                            env=offline_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines()
            if re.match(r"^\| (ls|mpd) \|", line)}
    assert set(rows) == {"ls", "mpd"}
    for line in rows.values():
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 6 and all(re.fullmatch(r"[+-]\d+\.\d", c) for c in cells[1:5]), line
