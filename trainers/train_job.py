"""One training job end to end: load the base, attach the trainable (a LoRA or a ControlNet),
train, export its file."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from core.fileio import EventLog, atomic_path
from .loop import train
from .methods import method_module
from .model import TrainableModel
from .precision import DTYPES
from .trainables import ControlNetTrainable, LoraTrainable, Trainable



def load_base(cfg):
    from core.checkpoints import load_pipeline

    return load_pipeline(cfg.base, tokenizer=cfg.tokenizer or None)


def make_trainable(cfg) -> Trainable:
    """What the method trains: its ``trainable_kind`` ("lora" unless it says "controlnet")."""
    kind = getattr(method_module(cfg.method).METHOD, "trainable_kind", "lora")
    if kind == "controlnet":
        return ControlNetTrainable(conditioning_scale=cfg.conditioning_scale)
    return LoraTrainable(cfg.rank, cfg.alpha, cfg.target_modules, init_seed=cfg.seed)


def training_device(requested: str = "", environ=os.environ) -> torch.device:
    """``--device``, or cuda:LOCAL_RANK under a multi-process launcher, or cuda if available,
    else the CPU."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if requested and world > 1:
        raise ValueError(f"--device {requested}: under a multi-process launcher each process uses "
                         "cuda:LOCAL_RANK; leave --device empty (choose GPUs with CUDA_VISIBLE_DEVICES)")
    if not requested:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device())
    device = torch.device(requested)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device {requested}: this machine has {count} CUDA device(s); "
                             f"use {'cuda:0' if count else 'cpu'} or leave --device empty")
    return device


def build_model(cfg) -> TrainableModel:
    device = training_device(getattr(cfg, "device", ""))
    return TrainableModel(
        load_base(cfg), trainable=make_trainable(cfg), dtype=DTYPES[cfg.mixed_precision], device=device,
        gradient_checkpointing=cfg.gradient_checkpointing, init_seed=cfg.seed,
    )


def make_sampler(cfg, model: TrainableModel, run_dir: Path, events: EventLog):
    """Validation images: the same prompts and seeds at every sampling step, LoRA on."""
    if not (cfg.sample_every and cfg.sample_prompts):
        return None
    if not isinstance(model.trainable, LoraTrainable):
        raise ValueError(f"--sample-every renders LoRA samples only; {cfg.method} trains a "
                         f"{model.trainable.kind}: set --sample-every 0")

    def sample(step: int) -> None:
        model.unet.eval()
        paths = []
        with torch.no_grad():
            for k, prompt in enumerate(cfg.sample_prompts):
                image = model.precision.generate(
                    model.pipe, prompt, num_inference_steps=cfg.sample_steps, height=cfg.resolution,
                    width=cfg.resolution, generator=torch.Generator().manual_seed(cfg.seed + k),
                )[0]
                path = run_dir / "samples" / f"step_{step:07d}_{k}.png"
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                paths.append(str(path))
        model.unet.train()
        events.emit("sample", step=step, paths=paths)

    return sample


def export_metadata(cfg, model: TrainableModel, method, result: dict) -> dict:
    return {
        "method": cfg.method,
        "preset": cfg.preset,
        "base_arch": model.arch,
        "base": cfg.base,
        "trainable": model.trainable.kind,
        **model.trainable.metadata(),
        "objectives": list(method.objective_names),
        "steps": result["steps"],
        "dataset_size": method.dataset_size(),
        "final_weights": result.get("final_weights"),
        **method.summary(),
        "config": cfg.to_dict(),
    }


def run_job(cfg, run_dir: Path, events: EventLog, *, resume: bool, stop_requested,
            keep_model: bool = False) -> dict:
    """Train and export; ``keep_model`` returns the trained model too (tests, notebooks)."""
    model = build_model(cfg)
    method = method_module(cfg.method).METHOD(cfg, model)
    result = train(cfg, method, run_dir, events, resume=resume,
                   sampler=make_sampler(cfg, model, run_dir, events), stop_requested=stop_requested)
    if result["status"] == "done":
        name = cfg.lora_name or f"{cfg.method.replace('-', '')}_{model.arch}.safetensors"
        path = run_dir / name
        model.trainable.export(path, export_metadata(cfg, model, method, result))
        result["lora"] = str(path)
    if keep_model:
        result["model"] = model
    return result
