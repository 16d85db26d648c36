"""One training job end to end: load the base, attach the trainable (a LoRA or a ControlNet),
train, export its file."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from core.fileio import SAMPLE, EventLog, atomic_path
from .loop import train
from .methods import method_module
from .cache import TensorCache
from .model import TrainableModel
from .precision import compute_dtype
from .run_dir import latest_checkpoint, load_checkpoint
from .training_state import trainable_state
from .trainables import ControlNetTrainable, LoraTrainable, Trainable
from .validation import Validator, prompts_of



def load_base(cfg, dtype: torch.dtype = torch.float32):
    """The base pipeline. A diffusion-transformer file is read straight into ``dtype`` (the compute
    dtype): Flux.1-dev in fp32 would take 48 GB before the model is cast to it. Other bases load
    in fp32 and are cast by the dtype policy, as before."""
    from core.checkpoints import dit_file_family, load_pipeline

    dtype = dtype if dit_file_family(cfg.base) else torch.float32
    return load_pipeline(cfg.base, dtype=dtype, tokenizer=cfg.tokenizer or None, text_encoders=cfg.text_encoders,
                         vae=cfg.vae or None)


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


def run_texts(cfg) -> list[str]:
    """Every text a run conditions on: the method's, the sample and validation prompts, and the
    empty negative prompt the renders' guidance uses."""
    texts = list(method_module(cfg.method).METHOD.texts(cfg))
    if cfg.sample_every:
        texts += cfg.sample_prompts
    if cfg.validate_every:
        texts += prompts_of(cfg)
    if cfg.sample_every or cfg.validate_every:
        texts.append("")
    return list(dict.fromkeys(texts))


def build_model(cfg) -> TrainableModel:
    device = training_device(getattr(cfg, "device", ""))
    dtype = compute_dtype(cfg.mixed_precision, device)
    texts = cache = None
    if cfg.unload_text_encoders:
        texts, cache = run_texts(cfg), TensorCache(Path(cfg.output) / "cache" / "text")
    return TrainableModel(
        load_base(cfg, dtype), trainable=make_trainable(cfg), dtype=dtype, device=device,
        gradient_checkpointing=cfg.gradient_checkpointing, init_seed=cfg.seed, base_weights=cfg.base_weights,
        texts=texts, text_cache=cache,
    )


def make_renderer(cfg, model: TrainableModel):
    """``render(pairs)``: PIL images of (prompt, seed) pairs with the current weights, LoRA on —
    the one rendering of ``--sample-every`` and ``--validate-every``, through the model family's
    pipeline. Refused before the first step on a family that cannot render yet."""
    if cfg.sample_every or cfg.validate_every:
        try:
            model.family.require_rendering()
            model.prompt_embeddings("")  # from embeddings once the text encoders are unloaded: can it?
        except ValueError as err:
            raise ValueError(f"--sample-every and --validate-every: {err}: set them to 0") from None

    def render(pairs: list[tuple[str, int]]) -> list:
        model.unet.eval()
        try:
            images = []
            for prompt, seed in pairs:
                embeddings = model.prompt_embeddings(prompt)  # once the text encoders are unloaded
                with torch.no_grad():
                    images += model.precision.generate(
                        model.family, prompt if embeddings is None else None, num_inference_steps=cfg.sample_steps,
                        height=cfg.resolution, width=cfg.resolution, generator=torch.Generator().manual_seed(seed),
                        **(embeddings or {}))
            return images
        finally:
            model.unet.train()

    return render


def make_sampler(cfg, model: TrainableModel, run_dir: Path, events: EventLog, render):
    """Sample images: the same prompts and seeds at every sampling step."""
    if not (cfg.sample_every and cfg.sample_prompts):
        return None
    if not isinstance(model.trainable, LoraTrainable):
        raise ValueError(f"--sample-every renders LoRA samples only; {cfg.method} trains a "
                         f"{model.trainable.kind}: set --sample-every 0")

    def sample(step: int) -> None:
        images = render([(prompt, cfg.seed + k) for k, prompt in enumerate(cfg.sample_prompts)])
        paths = []
        for k, image in enumerate(images):
            path = run_dir / "samples" / f"step_{step:07d}_{k}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            paths.append(str(path))
        events.emit(SAMPLE, step=step, paths=paths)

    return sample


def make_validator(cfg, model: TrainableModel, method, run_dir: Path, events: EventLog, render) -> Validator | None:
    if not cfg.validate_every:
        return None

    def export(path: Path, validation: dict) -> None:
        model.trainable.export(path, {**export_metadata(cfg, model, method, {"steps": validation["validation_step"]}),
                                      **validation})

    return Validator(cfg, run_dir, events, output_file_name(cfg, model), render, export)


def after_step_callback(cfg, sample, validate):
    """The loop's one per-step callback: sampling and validation, each on its own period."""
    periods = [(cfg.sample_every, sample), (cfg.validate_every, validate)]
    active = [(every, fn) for every, fn in periods if fn is not None and every]
    if not active:
        return None

    def after_step(step: int) -> None:
        for every, fn in active:
            if step % every == 0:
                fn(step)

    return after_step


def output_file_name(cfg, model: TrainableModel) -> str:
    return cfg.output_file or f"{cfg.method.replace('-', '')}_{model.arch}.safetensors"


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
    render = make_renderer(cfg, model)
    validator = make_validator(cfg, model, method, run_dir, events, render)
    after_step = after_step_callback(cfg, make_sampler(cfg, model, run_dir, events, render), validator)
    main = is_main_process()
    if resume and validator is not None and main:
        def load(path):
            model.trainable.load_state_dict(trainable_state(load_checkpoint(path)))

        validator.catch_up(latest_checkpoint(run_dir), load)
    result = train(cfg, method, run_dir, events, resume=resume, after_step=after_step,
                   stop_requested=stop_requested)
    if result["status"] == "done":
        if validator is not None and main and cfg.steps % cfg.validate_every:
            validator(cfg.steps)  # the final LoRA is always a candidate
        path = run_dir / output_file_name(cfg, model)
        model.trainable.export(path, export_metadata(cfg, model, method, result))
        result["lora"] = str(path)
        if validator is not None and validator.path.is_file():
            result["best_lora"] = str(validator.path)
    if keep_model:
        result["model"] = model
    return result
