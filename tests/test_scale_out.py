"""Past one process: build-pairs, annotate and evaluate under torchrun (gloo, CPU) and as array-job
shards give the records of a one-process run, byte for byte; a killed process loses only its items
in flight. Tiny models, few prompts and images; every run is a real command in its own process."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.fileio import read_jsonl
from train_helpers import ROOT, make_region_dataset, offline_env, train_cli
from trainers import annotate, build_pairs, evaluate, shards

PROMPTS = ["a man waving", "a woman smiling", "two children", "an old man reading"]
# One thread per process everywhere, as torchrun sets: a float reduction's order may depend on the
# thread count, and "the same records" is a claim about the same arithmetic.
ENV = {**offline_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: str, *args, processes: int = 1, **popen) -> subprocess.Popen:
    """``python -m trainers COMMAND`` in one process, or under torchrun with ``processes``."""
    argv = [sys.executable, "-m", "trainers", command, *map(str, args)]
    if processes > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()), *argv[1:]]
    return subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(*procs: subprocess.Popen, ok: bool = True) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if ok:
            assert proc.returncode == 0, err[-4000:]
        results.append((proc.returncode, out, err))
    return results


def run(command: str, *args, processes: int = 1, ok: bool = True) -> tuple[int, str, str]:
    return finish(launch(command, *args, processes=processes), ok=ok)[0]


def images(folder: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob(pattern))}


# ---- the shared module, without models ------------------------------------------------------------
def test_shares_split_items_by_position_and_combine_with_a_process_group():
    whole = [shards.Share.of(environ={})]
    assert [k for k in range(5) if whole[0].owns(k)] == [0, 1, 2, 3, 4]
    group = [shards.Share.of((1, 2), environ={"RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    assert [(s.index, s.count) for s in group] == [(2, 4), (3, 4)]
    assert [[k for k in range(8) if s.owns(k)] for s in group] == [[2, 6], [3, 7]]
    assert list(group[1].group_indices()) == [2, 3] and group[0].reporter and not group[1].reporter
    for bad in ("2/2", "a/b", "1", "-1/2"):
        with pytest.raises(Exception):
            shards.shard_spec(bad)


def _store(folder: Path, share: shards.Share) -> shards.ShardedRecords:
    return shards.ShardedRecords(folder / "out.jsonl", share, key=lambda r: r["item"],
                                 finished=lambda r: r["status"] == "ok")


def test_merge_names_a_missing_an_incomplete_and_a_duplicated_shard(tmp_path):
    keys = ["a", "b", "c", "d"]
    first = _store(tmp_path, shards.Share.of((0, 2), environ={}))
    first.writer().append({"item": "a", "status": "ok"})  # shard 0/2 owns a and c: it stopped after a
    merger = _store(tmp_path, shards.Share.of(environ={}))
    with pytest.raises(shards.ShardError) as err:
        merger.check_complete(merger.load(), keys)
    assert "shard 0/2 is incomplete" in str(err.value) and "'c'" in str(err.value)
    assert "shard 1/2 did not run (no out.part-1-of-2.jsonl)" in str(err.value)

    first.writer().append({"item": "c", "status": "ok"})
    second = _store(tmp_path, shards.Share.of((1, 2), environ={}))
    writer = second.writer()
    writer.append({"item": "b", "status": "error"})
    writer.append({"item": "d", "status": "ok"})
    with pytest.raises(shards.ShardError) as err:  # an error record is a record: b is not missing
        merger.check_complete({k: r for k, r in merger.load().items() if k != "b"}, keys)
    records = merger.load()
    merger.check_complete(records, keys)
    merger.merge([records[k] for k in keys])
    assert [r["item"] for r in read_jsonl(tmp_path / "out.jsonl")] == keys and not merger.parts()

    # a failure retried by a later layout is replaced; a finished item recorded twice is refused
    retry = _store(tmp_path, shards.Share.of((0, 3), environ={}))
    retry.writer().append({"item": "b", "status": "ok"})
    assert merger.load()["b"]["status"] == "ok"
    again = _store(tmp_path, shards.Share.of((1, 3), environ={}))
    again.writer().append({"item": "b", "status": "ok"})
    with pytest.raises(shards.ShardError, match=r"'b' was recorded by two shards, out.part-0-of-3.jsonl and "
                                                r"out.part-1-of-3.jsonl"):
        merger.load()


def test_a_shard_does_its_own_items_and_waits_for_no_other_shard(tmp_path):
    import threading

    keys = ["a", "b", "c", "d", "e"]
    store = _store(tmp_path, shards.Share.of((1, 2), environ={}))
    store.load()
    done = []

    def produce(positions):
        for k in positions:
            done.append(k)
            yield {"item": keys[k], "status": "ok"}

    worker = threading.Thread(target=shards.work_share, args=(store, list(enumerate(keys)), produce, "t", "item"),
                              daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the shard waited for items that are not its own"
    assert done == [1, 3] and [r["item"] for r in read_jsonl(tmp_path / "out.part-1-of-2.jsonl")] == ["b", "d"]


def test_the_same_shard_twice_at_once_is_refused(tmp_path):
    running = _store(tmp_path, shards.Share.of((1, 2), environ={}))
    held = running.writer()  # locked while ``running`` lives
    code = ("import sys; from pathlib import Path; from trainers import shards\n"
            "s = shards.ShardedRecords(Path(sys.argv[1]) / 'out.jsonl', shards.Share.of((1, 2), environ={}),"
            " key=lambda r: r['item'])\n"
            "try:\n    s.writer()\nexcept shards.ShardError as e:\n    print(e); sys.exit(3)\n")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 3 and "shard 1/2 is already running" in other.stdout
    held.append({"item": "b", "status": "ok"})


def test_every_option_survives_the_launchers_abbreviation_parsing():
    """torchrun and accelerate launch parse abbreviations of their own options anywhere on the
    line; an option of ours that is a prefix of two of theirs stops the launch ("ambiguous")."""
    import argparse

    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    from trainers import train

    for name, module in (("build-pairs", build_pairs), ("annotate", annotate), ("evaluate", evaluate),
                         ("train", train)):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        options = [o for action in parser._actions for o in action.option_strings
                   if o.startswith("--") and o not in ("--help", "--n")]  # --n: the documented short alias
        assert name == "train" or {"--shard", "--merge"} <= set(options)
        for option in options:
            line = ["-m", "trainers", name, option, "1"]
            torchrun = get_args_parser().parse_args(["--nproc-per-node", "2", *line])
            assert torchrun.training_script_args == [name, option, "1"], (name, option)
            accelerate = launch_command_parser().parse_args(["--num_processes", "2", *line])
            assert accelerate.training_script_args == [name, option, "1"], (name, option)
    parser = argparse.ArgumentParser()
    build_pairs.add_arguments(parser)
    assert parser.parse_args(["--prompts", "p", "--output", "o", "--n", "3"]).n == 3


# ---- the commands, in several processes -----------------------------------------------------------
@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def pairs_args(prompts: Path, out: Path) -> list:
    return ["--base", "tiny-sd15", "--prompts", prompts, "--images-per-prompt", 2, "--batch", 2, "--steps", 1,
            "--size", 64, "--output", out]


@pytest.fixture(scope="module")
def one_process_pairs(prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "one"
    run("build-pairs", *pairs_args(prompts, out))
    return out


def assert_same_pairs(folder: Path, reference: Path) -> None:
    assert (folder / "pairs.jsonl").read_bytes() == (reference / "pairs.jsonl").read_bytes()
    assert images(folder, "images/*.png") == images(reference, "images/*.png")
    assert images(folder, "masks/*.png") == images(reference, "masks/*.png")
    assert not list(folder.glob("*.part-*")), "part files left after the merge"


@pytest.mark.slow
def test_build_pairs_in_two_processes_and_in_two_shards_equals_one_process(one_process_pairs, prompts, tmp_path):
    two = tmp_path / "two"
    _, out, _ = run("build-pairs", *pairs_args(prompts, two), processes=2)
    assert out.count("done: ") == 1, "rank 0 alone reports"
    assert_same_pairs(two, one_process_pairs)

    sharded = tmp_path / "sharded"
    run("build-pairs", *pairs_args(prompts, sharded), "--shard", "1/2")
    code, _, err = run("build-pairs", *pairs_args(prompts, sharded), "--merge", ok=False)
    assert code != 0 and "shard 0/2 did not run" in err and not (sharded / "pairs.jsonl").exists()
    run("build-pairs", *pairs_args(prompts, sharded), "--shard", "0/2")
    run("build-pairs", *pairs_args(prompts, sharded), "--merge")
    assert_same_pairs(sharded, one_process_pairs)


def _worker(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank``."""
    for pid in map(int, Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()):
        if f"RANK={rank}" in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0"):
            return pid
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow
def test_a_killed_process_loses_only_its_prompts_in_flight(one_process_pairs, prompts, tmp_path):
    out = tmp_path / "killed"
    proc = launch("build-pairs", *pairs_args(prompts, out), processes=2)
    part = out / "pairs.part-1-of-2.jsonl"
    deadline = time.monotonic() + 600
    while not read_jsonl(part):  # rank 1 has finished its first prompt of two
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before rank 1 recorded"
        time.sleep(0.05)
    os.kill(_worker(proc.pid, 1), signal.SIGKILL)
    code, _, _ = finish(proc, ok=False)[0]
    assert code != 0 and not (out / "pairs.jsonl").exists()
    kept = read_jsonl(part) + read_jsonl(out / "pairs.part-0-of-2.jsonl")
    assert 1 <= len(kept) < len(PROMPTS), "killed too late to test anything"
    _, resumed, _ = run("build-pairs", *pairs_args(prompts, out))
    assert f"{len(kept)} already done" in resumed
    assert_same_pairs(out, one_process_pairs)


@pytest.mark.slow
def test_annotate_in_two_processes_and_in_two_shards_equals_one_process(sample_photos, tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    for path in sample_photos[:3]:
        shutil.copy(path, source / path.name)
    folders = {name: tmp_path / name for name in ("one", "two", "sharded")}
    for folder in folders.values():
        shutil.copytree(source, folder)
    common = ["--workers", 1, "--no-tiles"]
    run("annotate", folders["one"], *common)
    run("annotate", folders["two"], *common, processes=2)
    finish(launch("annotate", folders["sharded"], *common, "--shard", "0/2"),
           launch("annotate", folders["sharded"], *common, "--shard", "1/2"))
    run("annotate", folders["sharded"], *common, "--merge")
    reference = folders["one"] / "metadata.jsonl"
    assert {r["status"] for r in read_jsonl(reference)} == {"ok"}
    for name in ("two", "sharded"):
        assert (folders[name] / "metadata.jsonl").read_bytes() == reference.read_bytes(), name
        assert images(folders[name], "masks/*.png") == images(folders["one"], "masks/*.png"), name


@pytest.mark.slow
def test_evaluate_in_two_processes_and_in_two_shards_equals_one_process(prompts, tmp_path):
    import json

    data = make_region_dataset(tmp_path / "regions", count=2, size=64)
    trained = train_cli("--method", "fairhuman", "--rank", 4, "--data", data, "--output", tmp_path / "fh", "--base",
                        "tiny-sd15", "--resolution", 64, "--steps", 1, "--checkpoint-every", 0)
    assert trained.returncode == 0, trained.stderr[-2000:]
    common = ["--lora", tmp_path / "fh" / "fairhuman_sd15.safetensors", "--prompts", prompts, "--seeds", 0,
              "--strengths", 0.5, "--steps", 1, "--size", 64, "--output"]
    run("evaluate", *common, tmp_path / "one")
    run("evaluate", *common, tmp_path / "two", processes=2)
    finish(launch("evaluate", *common, tmp_path / "sharded", "--shard", "0/2"),
           launch("evaluate", *common, tmp_path / "sharded", "--shard", "1/2"))
    run("evaluate", *common, tmp_path / "sharded", "--merge")

    def report(name):
        values = json.loads((tmp_path / name / "report.json").read_text())
        values.pop("command")  # names the output folder
        return values

    reference = (tmp_path / "one" / "detections.jsonl").read_bytes()
    assert len(reference.splitlines()) == 2 * len(PROMPTS)
    for name in ("two", "sharded"):
        assert (tmp_path / name / "detections.jsonl").read_bytes() == reference, name
        assert images(tmp_path / name, "images/**/*.png") == images(tmp_path / "one", "images/**/*.png"), name
        assert report(name) == report("one"), name


# ---- training in two processes ---------------------------------------------------------------------
TRAIN_STEPS, TRAIN_LR = 3, 1e-3


def training_data(method: str, folder: Path) -> Path:
    if method == "fairhuman":
        return make_region_dataset(folder, count=4, size=64)
    if method == "fairhuman-controlnet":
        from controlnet_helpers import make_conditioned_dataset

        return make_conditioned_dataset(folder, count=4, size=64)
    from test_fair_dpo import make_pairs_folder  # pairs with the winner's and loser's region masks

    return make_pairs_folder(folder, pairs=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each method trained twice at one global batch of 2: one process accumulating 2 micro-batches
    per step, and two processes (gloo) of 1 micro-batch each. {method: (one run, two-process run)}."""
    import json

    root = tmp_path_factory.mktemp("train")
    runs = {}
    specs = {1: [], 2: []}
    for method in ("fairhuman", "fairhuman-controlnet", "hg-dpo", "fair-dpo"):
        data = training_data(method, root / method / "data")
        common = ["--method", method, "--base", "tiny-sd15", "--data", str(data), "--resolution", "64", "--rank", "4",
                  "--steps", str(TRAIN_STEPS), "--lr", str(TRAIN_LR), "--batch-size", "1", "--checkpoint-every",
                  "0", "--mixed-precision", "no", "--seed", "3"]
        if method in ("hg-dpo", "fair-dpo"):
            common += ["--eval-pairs", "0"]
        runs[method] = (root / method / "one", root / method / "two")
        specs[1].append([*common, "--grad-accum", "2", "--output", str(runs[method][0])])
        specs[2].append([*common, "--grad-accum", "1", "--output", str(runs[method][1])])
    for processes, argvs in specs.items():
        spec = root / f"spec{processes}.json"
        spec.write_text(json.dumps(argvs))
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "tests" / "dist_worker.py"), "train",
                str(spec)]
        result = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, result.stderr[-4000:]
    return runs


def _weights(run: Path, rank: int) -> list:
    import json

    record = json.loads((run / f"weights{rank}.json").read_text())
    assert record["exit"] == 0
    return record["weights"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fairhuman", "fairhuman-controlnet", "hg-dpo", "fair-dpo"])
def test_two_processes_train_what_one_trains_at_the_same_global_batch(trained, method):
    """The per-objective gradients are averaged across processes before the Gramian, so the two
    processes solve one set of weights per step, bit for bit, and train what one process
    accumulating both micro-batches trains. Not bit for bit: the two sum the micro-batch gradients
    in another order (all-reduce vs. accumulation), about 1e-7 relative in fp32 — but AdamW's first
    steps move each element by about lr·sign(g), so an element whose gradient is ~0 may move by
    up to 2·lr a step the other way. Hence: every element within 2·lr·steps, and the whole update
    within 1e-3 of its size (a different micro-batch or noise, or weights solved per rank, would
    differ by the order of the update itself)."""
    from safetensors.torch import load_file

    one, two = trained[method]
    per_rank = [_weights(two, 0), _weights(two, 1)]
    assert per_rank[0] == per_rank[1], "the ranks solved different objective weights"
    fair = method != "hg-dpo"  # hg-dpo sums its losses: nothing to solve
    assert len(per_rank[0]) == (TRAIN_STEPS if fair else 0)
    reference = _weights(one, 0)
    assert len(reference) == len(per_rank[0])
    for a, b in zip(reference, per_rank[0]):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-6)

    [file_one] = one.glob("*.safetensors")
    [file_two] = two.glob("*.safetensors")
    assert file_one.name == file_two.name
    a, b = load_file(str(file_one)), load_file(str(file_two))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 2 * TRAIN_LR * TRAIN_STEPS, key
    # the tensors that start at zero (LoRA up, ControlNet zero convolutions) hold the update itself
    grown = [key for key in a if "lora_up" in key or key.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert grown
    update = sum(float(a[key].double().pow(2).sum()) for key in grown) ** 0.5
    diff = sum(float((a[key] - b[key]).double().pow(2).sum()) for key in grown) ** 0.5
    assert update > 0 and diff <= 1e-3 * update, (diff, update)


def test_bench_scale_reports_steady_rates_and_refuses_a_run_start_up_dominates():
    """`bench scale`: the rate is P prompts over the extra wall time of 2P (start-up cancels); a
    pair of runs whose difference is under a tenth of the longer is too small to measure."""
    from trainers.benchmarks.scale import expectation, rate_row

    row, rate = rate_row(1, short=30.0, long=50.0, p=4, n=2, base=None)
    assert rate == pytest.approx(12.0)  # 4 prompts in 20 s
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:7] == ["12.0", "0.40", "1.00", "9.6"]  # pairs/min, images/s, speedup, with start-up
    _, faster = rate_row(2, short=20.0, long=30.0, p=4, n=2, base=rate)
    assert faster == pytest.approx(24.0)
    row, none = rate_row(2, short=20.3, long=19.7, p=4, n=2, base=rate)
    assert none is None and "too small to measure" in row
    lines = expectation(2.5, [1, 4], n=20)  # a pair is 20 images of 2.5 s: 50 s on one GPU
    assert "| 1 | 72 | 0.40 | 138.9 h |" in lines and "| 4 | 288 | 1.60 | 34.7 h |" in lines
