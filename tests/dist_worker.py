"""One rank of the 2-process CPU test (launched by torch.distributed.run with gloo): trains a
few FairHuman steps with the real loop and saves what this rank ended with."""
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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
