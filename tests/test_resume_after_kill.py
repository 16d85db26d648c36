"""A build-pairs or annotate run killed with SIGKILL at a random point resumes and ends with the
same records (and files) as an uninterrupted run; a failed prompt is retried on the next run."""
from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.fileio import read_jsonl
from train_helpers import ROOT, offline_env

pytestmark = pytest.mark.slow

PROMPTS = ["a photo of a woman", "a photo of a man waving", "two friends in a park", "a child smiling",
           "a family portrait"]


def command(name: str, *args) -> list[str]:
    return [sys.executable, "-m", "trainers", name, *map(str, args)]


def run_to_end(argv: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def kill_at_random_point(argv: list[str], journal: Path, seed: int) -> None:
    """Start the command, wait until it has recorded its first item, then SIGKILL it after a
    random further delay (while it is generating, scoring or writing)."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=offline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (journal.is_file() and journal.stat().st_size > 0):
        assert proc.poll() is None, "the run ended before it recorded anything"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    proc.kill()
    proc.wait()


def files(folder: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(pattern)) if not p.name.startswith(".")}


def test_build_pairs_killed_then_resumed_equals_uninterrupted(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def build(out):
        return command("build-pairs", "--base", "tiny-sd15", "--prompts", prompts, "--n", 3, "--batch", 3,
                       "--steps", 2, "--size", 64, "--scorer", "anatomy", "--output", out)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(build(straight))
    kill_at_random_point(build(killed), killed / "pairs.jsonl", seed=1)
    assert len(read_jsonl(killed / "pairs.jsonl")) < len(PROMPTS), "killed too late to test anything"
    resumed = run_to_end(build(killed))
    assert "already done" in resumed.stdout
    assert read_jsonl(killed / "pairs.jsonl") == read_jsonl(straight / "pairs.jsonl")
    assert files(killed, "images/*.png") == files(straight, "images/*.png")


def test_annotate_killed_then_resumed_equals_uninterrupted(tmp_path, sample_photos):
    source = tmp_path / "photos"
    source.mkdir()
    for path in sample_photos:
        shutil.copy(path, source / path.name)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(source, straight)
    shutil.copytree(source, killed)
    run_to_end(command("annotate", straight, "--workers", 1))
    kill_at_random_point(command("annotate", killed, "--workers", 1), killed / "metadata.jsonl", seed=2)
    assert len(read_jsonl(killed / "metadata.jsonl")) < len(sample_photos), "killed too late to test anything"
    run_to_end(command("annotate", killed, "--workers", 1))
    assert read_jsonl(killed / "metadata.jsonl") == read_jsonl(straight / "metadata.jsonl")
    assert files(killed, "masks/*.png") == files(straight, "masks/*.png")


def test_a_failed_prompt_is_retried_and_counted(tmp_path, monkeypatch, capsys):
    """A scorer that fails on the first run: every prompt is recorded as an error, the command
    exits 1 and says how many failed; the next run retries them and succeeds."""
    from core import scorers
    from trainers.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    argv = ["build-pairs", "--base", "tiny-sd15", "--prompts", str(prompts), "--n", "2", "--steps", "1",
            "--size", "64", "--output", str(tmp_path / "pairs")]
    real = scorers.get_scorer

    class Broken:
        def score(self, images, prompts):
            raise RuntimeError("scorer crashed")

    monkeypatch.setattr(scorers, "get_scorer", lambda *a, **k: Broken())
    assert main(argv) == 1
    out = capsys.readouterr()
    assert "2 prompts failed" in out.out and "error: 2 of 2 prompts failed" in out.err
    assert {r["status"] for r in read_jsonl(tmp_path / "pairs" / "pairs.jsonl")} == {"error"}

    monkeypatch.setattr(scorers, "get_scorer", real)
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "2 failed before and tried again" in out.out
    records = read_jsonl(tmp_path / "pairs" / "pairs.jsonl")
    assert [r["prompt"] for r in records] == PROMPTS[:2]  # one record per prompt, in order
    assert {r["status"] for r in records} <= {"ok", "tied"}
