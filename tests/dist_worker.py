"""One rank of the multi-process CPU tests (launched by torch.distributed.run with gloo).

``dist_worker.py DATA OUT``: trains a few FairHuman steps with the real loop and saves what this
rank ended with (``rankN.pt``).

``dist_worker.py train SPEC``: runs each ``python -m trainers train`` command line of the JSON list
SPEC in this process (one process group for all of them), recording the objective weights that
every optimizer step of this rank solved, in ``<its --output>/weights<RANK>.json``.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(data: str, out: str) -> None:
    from trainers.config import TrainConfig
    from trainers.train_job import build_model
    from core.fileio import EventLog
    from trainers.loop import train
    from trainers.methods.fairhuman import FairHuman
    from trainers.train import _init_distributed

    _init_distributed()
    rank = dist.get_rank()
    cfg = TrainConfig(method="fairhuman", base="tiny-sdxl", data=data, output=out, steps=3, resolution=128,
                      rank=4, lr=1e-2, batch_size=1, checkpoint_every=0, max_grad_norm=1.0)
    model = build_model(cfg)
    method = FairHuman(cfg, model)
    seen = []
    original = method.losses

    def spy(batch, generator):
        seen.append(list(batch["index"]))
        return original(batch, generator)

    method.losses = spy
    devices = []  # the device of every tensor handed to a collective
    all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        devices.append(str(tensor.device))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording_all_reduce
    result = train(cfg, method, Path(out), EventLog(Path(out) / f"events{rank}.jsonl", echo=False))
    dist.all_reduce = all_reduce
    torch.save({"lora": model.trainable.state_dict(), "weights": result["final_weights"], "seen": seen,
                "collective_devices": devices, "grad_device": str(model.trainable.parameters()[0].device)},
               Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def train_commands(spec: str) -> None:
    from core import combine
    from trainers.cli import main as cli

    solved: list = []
    step = combine.FairCombiner.step

    def recording_step(self, *args, **kwargs):  # the weights this rank solved, step by step
        result = step(self, *args, **kwargs)
        solved.append(result.weights.tolist())
        return result

    combine.FairCombiner.step = recording_step
    rank = os.environ.get("RANK", "0")
    for argv in json.loads(Path(spec).read_text()):
        solved.clear()
        code = cli(["train", *argv])
        out = Path(argv[argv.index("--output") + 1])
        (out / f"weights{rank}.json").write_text(json.dumps({"exit": code, "weights": solved}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train_commands(sys.argv[2])
    else:
        main(sys.argv[1], sys.argv[2])
