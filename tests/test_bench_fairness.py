"""``bench fairness`` at a small size, so the benchmark cannot rot: both controls' tables have a
row per weighting with every column, the discrimination check and the significance line are
printed under each, and ``--plot`` writes a PNG. Its numbers are not checked (too few steps to
mean anything); the intervals it prints are checked against Student's t table."""
import re
import subprocess
import sys

import pytest

from train_helpers import ROOT, offline_env

from trainers.benchmarks.intervals import mean_interval, t_quantile, welch

CELL = r"[+-]\d+\.\d ± \d+\.\d"
SHARES = r"\d\.\d\d / \d\.\d\d / \d\.\d\d"


@pytest.mark.slow
def test_bench_fairness_small(tmp_path):
    plot = tmp_path / "fairness.png"
    result = subprocess.run(
        [sys.executable, "-m", "trainers", "bench", "fairness", "--steps", "10", "--seeds", "2",
         "--adamw-lrs", "3e-3", "--sgd-lrs", "0.2", "--variants", "ls,global-only,mpd", "--held-out", "4",
         "--probes", "2", "--plot", str(plot)],
        cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    summary = out.split("\nbench fairness: ", 1)[-1]  # after the progress lines
    tables = re.split(r"\n\((?:a|b)\) ", summary)[1:]  # the two controls' sections
    assert len(tables) == 2, out
    assert tables[0].startswith("own best AdamW lr") and tables[1].startswith("matched norm"), out
    for table in tables:
        rows = {line.split("|")[1].strip(): line for line in table.splitlines() if re.match(r"^\| [a-z-]+ \| \d", line)}
        assert set(rows) == {"ls", "global-only", "mpd"}, table
        for line in rows.values():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 8, line
            assert all(re.fullmatch(CELL, c) for c in cells[2:7]) and re.fullmatch(SHARES, cells[7]), line
        assert re.search(r"^discriminates: (yes|no) — global-only starves the (face|hand): .*margin -?\d+\.\d ± \d+\.\d",
                         table, re.M), table
        assert re.search(r"^significant differences \(Welch 95 %\): global-only vs ls: .*; mpd vs ls: ", table, re.M)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_intervals_match_students_t_table():
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)
    mean, half = mean_interval([1.0, 2.0, 3.0])  # sd 1, n 3: 4.303 / sqrt(3)
    assert (mean, half) == pytest.approx((2.0, 4.303 / 3 ** 0.5), abs=1e-3)
    diff, half = welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])  # equal variances: df 4, se sqrt(2/3)
    assert (diff, half) == pytest.approx((-3.0, 2.776 * (2 / 3) ** 0.5), abs=1e-3)
