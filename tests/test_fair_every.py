"""Amortized fairness (``--fair-every N``): between solves, the update is exactly Σ w_i g_i with
the last solved weights; every objective's share of the update is logged; resume stays exact."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from core.fileio import read_events
from train_helpers import ROOT, lora_tensors, make_region_dataset, offline_env, train_cli
from core.combine import FairCombiner
from core.weighting import get_weighting


def _toy(seed: int):
    """Three objectives of two parameter tensors with conflicting, differently sized gradients."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(5, generator=generator, requires_grad=True)
    b = torch.randn(3, 2, generator=generator, requires_grad=True)
    targets = [torch.randn(5, generator=generator) * s for s in (1.0, 3.0, 0.3)]

    def losses():
        return torch.stack([((a - targets[0]) ** 2).sum() + (b ** 2).sum(), (4 * (a - targets[1]) ** 2).sum(),
                            ((a - targets[2]) ** 2).sum() + ((b - 1) ** 2).sum()])

    return [a, b], losses


def _combiner(params, every: int) -> FairCombiner:
    return FairCombiner(params, get_weighting("mpd", 3), 3, every=every)


def test_amortized_step_applies_the_last_weights_exactly():
    params, losses = _toy(0)
    combiner = _combiner(params, every=4)
    combiner.begin(0)
    assert combiner.solving
    combiner.backward(losses())
    solved = combiner.finish(torch.Generator().manual_seed(0))
    combiner.commit()
    shares = combiner.shares
    assert shares is not None and shares.sum().item() == pytest.approx(1.0, abs=1e-6)
    for p in params:
        p.grad = None

    with torch.no_grad():  # the parameters move, so the amortized step sees new gradients
        params[0].add_(0.1)
    combiner.begin(1)
    assert not combiner.solving
    combiner.backward(losses())
    weights = combiner.finish(torch.Generator().manual_seed(1))
    assert torch.equal(weights, solved) and combiner.shares is None
    got = [p.grad.clone() for p in params]

    values = losses()
    per_objective = [torch.autograd.grad(values[i], params, retain_graph=True) for i in range(3)]
    expected = [sum(solved[i] * per_objective[i][k] for i in range(3)) for k in range(2)]
    plain = [sum(per_objective[i][k] for i in range(3)) for k in range(2)]
    for g, e, s in zip(got, expected, plain):
        assert torch.allclose(g, e, atol=1e-6)
        assert not torch.allclose(g, s, atol=1e-3)  # not the plain sum
    combiner.begin(4)
    assert combiner.solving  # every 4th step solves again


def test_an_objective_absent_at_a_solve_keeps_its_earlier_weight():
    params, losses = _toy(1)
    combiner = _combiner(params, every=2)
    combiner.begin(0)
    combiner.backward(losses())
    first = combiner.finish(None)
    combiner.commit()
    combiner.begin(2)  # a solve whose batch has no hand
    combiner.backward(losses(), active=torch.tensor([True, True, False]))
    second = combiner.finish(None)
    combiner.commit()
    assert second[2] == 0 and combiner.last_weights[2] == first[2] > 0
    assert torch.equal(combiner.last_weights[:2], second[:2])


COMMON = ["--method", "fairhuman", "--base", "tiny-sd15", "--resolution", "64", "--rank", "4", "--lr", "1e-2",
          "--batch-size", "2", "--seed", "0", "--fair-every", "4"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_region_dataset(tmp_path_factory.mktemp("regions"), count=4, size=64)


@pytest.mark.slow
def test_fair_every_events_and_exact_resume(dataset, tmp_path):
    straight = tmp_path / "straight"
    result = train_cli(*COMMON, "--data", dataset, "--output", straight, "--steps", 10, "--checkpoint-every", 0)
    assert result.returncode == 0, result.stderr[-2000:]
    progress = [e for e in read_events(straight / "events.jsonl") if e["event"] == "progress"]
    solved = [e["step"] for e in progress if "shares" in e]
    assert solved == [1, 5, 9]  # steps 0, 4 and 8 solve
    for e in progress:
        if "shares" in e:
            weights = e["weights"]
            assert sum(e["shares"]) == pytest.approx(1.0, abs=1e-5)
        else:
            assert e["weights"] == weights  # the last solved weights

    killed = tmp_path / "killed"
    argv = [sys.executable, "-m", "trainers", "train", *COMMON, "--data", str(dataset), "--output", str(killed),
            "--steps", "10", "--checkpoint-every", "3"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=offline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not any(e["event"] == "checkpoint" and e["step"] == 6 for e in read_events(killed / "events.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # step 6 is between solves: the resumed run must continue with the weights solved at step 4
    resumed = train_cli(*COMMON, "--data", dataset, "--output", killed, "--steps", 10, "--checkpoint-every", 3,
                        "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = lora_tensors(straight / "fairhuman_sd15.safetensors"), lora_tensors(killed / "fairhuman_sd15.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_schedule_state_round_trips_through_a_checkpoint(tmp_path):
    params, losses = _toy(2)
    combiner = _combiner(params, every=3)
    combiner.begin(0)
    combiner.backward(losses())
    combiner.finish(None)
    combiner.commit()
    path = tmp_path / "state.pt"
    torch.save(combiner.state_dict(), path)
    restored = _combiner(params, every=3)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(restored.last_weights, combiner.last_weights)
    restored.begin(1)
    assert not restored.solving  # a resumed run between solves keeps the solved weights
    restored.load_state_dict({"weighting": {}})  # a checkpoint from before --fair-every
    restored.begin(1)
    assert restored.solving


@pytest.mark.slow
def test_a_checkpoint_in_the_old_format_still_resumes_exactly(dataset, tmp_path):
    """Checkpoints written before this format keep the trained tensors under "lora" and have no
    "last_weights": they resume, and the run ends with the same LoRA as an uninterrupted one."""
    run = tmp_path / "run"
    result = train_cli(*COMMON, "--data", dataset, "--output", run, "--steps", 8, "--checkpoint-every", 4)
    assert result.returncode == 0, result.stderr[-2000:]
    straight = lora_tensors(run / "fairhuman_sd15.safetensors")
    checkpoint = run / "checkpoints" / "step_0000004.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert "lora" not in state and state["last_weights"] is not None  # today's format
    state["lora"] = state.pop("trainable")
    del state["last_weights"]
    torch.save(state, checkpoint)
    (run / "fairhuman_sd15.safetensors").unlink()
    resumed = train_cli(*COMMON, "--data", dataset, "--output", run, "--steps", 8, "--checkpoint-every", 4,
                        "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [e["step"] for e in read_events(run / "events.jsonl") if e["event"] == "resume"] == [4]
    again = lora_tensors(run / "fairhuman_sd15.safetensors")
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)


def test_bench_times_fair_every_n_against_n_plain_steps():
    """`bench fairhuman`'s amortized table divides N fair-every-N steps by N; its plain baseline
    must be N plain steps timed the same way (one warm call would favour plain)."""
    from trainers.benchmarks.fairhuman import amortized_steps

    params, losses = _toy(0)
    forwards = []

    def counted():
        forwards.append(1)
        return losses(), None

    fns = amortized_steps(params, counted, every=(3, 5))
    assert set(fns) == {"plain 3", "fair-every 3", "plain 5", "fair-every 5"}
    for name, fn in fns.items():
        forwards.clear()
        fn()
        assert len(forwards) == int(name.split()[-1]), name
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), name
