"""Training configuration: one dataclass, filled from defaults, a YAML/JSON file and flags.

Precedence: command-line flag > config file > method default > field default. The resolved
configuration is written into the run directory (``config.json``) and is what ``--resume``
reloads, so a resumed run cannot silently change its recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainConfig:
    method: str = "fairhuman"
    base: str = "tiny-sdxl"
    data: str = ""
    output: str = "outputs/run"
    steps: int = 1000
    resolution: int = 1024
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"  # adamw | adamw8bit | auto
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    rank: int = 256
    alpha: float | None = None  # None: alpha = rank
    target_modules: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    seed: int = 0
    # FairHuman
    weighting: str = "mpd"
    weighting_options: dict = field(default_factory=dict)
    normalization: str = "reference"  # reference | area
    batched_vjp: bool = True
    tokenizer: str = ""
    random_crop: bool = True
    flip_p: float = 0.5
    bucketing: bool = True
    cache_latents: bool = False
    # HG-DPO
    beta: float | None = None  # None: method default by architecture
    lambda_stat: float = 10000.0
    eval_pairs: int = 64  # 0: no fixed-probe evaluation
    # jobs
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    sample_every: int = 0
    eval_every: int = 0
    sample_prompts: list = field(default_factory=list)
    sample_steps: int = 20
    max_nan_steps: int = 10
    lora_name: str = ""  # file name of the exported LoRA; default <method>_<base arch>.safetensors

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

HELP = {
    "method": "fairhuman (MPD-fair global/face/hand losses) or hg-dpo (Diffusion-DPO + statistic matching)",
    "base": "tiny-sd15, tiny-sdxl, a single-file checkpoint (.safetensors, SD1.5 or SDXL) or a diffusers folder",
    "data": "dataset folder: annotated images (fairhuman) or a pairs folder from build-pairs (hg-dpo)",
    "output": "run directory (config, events.jsonl, checkpoints, samples, the LoRA)",
    "steps": "optimizer steps",
    "resolution": "training side in pixels (buckets keep about resolution² pixels)",
    "batch_size": "images per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "learning rate (paper: 1e-5)",
    "lr_scheduler": "diffusers scheduler name: constant, constant_with_warmup, cosine, linear, ...",
    "warmup_steps": "learning-rate warm-up steps",
    "optimizer": "adamw, adamw8bit (needs a working bitsandbytes) or auto (adamw8bit when it works, else adamw; hg-dpo's default)",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "clip the combined gradient to this norm (0 disables)",
    "rank": "LoRA rank (FairHuman paper: 256; HG-DPO paper: 8)",
    "alpha": "LoRA alpha (default: the rank)",
    "target_modules": "UNet module names that get LoRA (comma-separated)",
    "mixed_precision": "no, fp16 or bf16 (LoRA parameters stay fp32)",
    "gradient_checkpointing": "trade compute for activation memory",
    "seed": "seed of data order, augmentation, noise and timesteps",
    "weighting": "mpd, mpd-closed-form, ls, dwa, uw, rlw, si, nash-mtl",
    "weighting_options": "JSON object of weighting options, e.g. '{\"alpha\": 2}'",
    "normalization": "masked-loss normalization: reference (FairHuman code) or area",
    "batched_vjp": "objective gradients by one batched vector-Jacobian product (faster) or K backward passes (less transient memory)",
    "tokenizer": "folder with CLIP's vocab.json and merges.txt, for single-file checkpoints outside a ComfyUI tree",
    "random_crop": "random crops (else centred)",
    "flip_p": "probability of a horizontal flip",
    "bucketing": "aspect-ratio buckets (else square crops)",
    "cache_latents": "keep each image view's VAE latent in the run directory (needs --random-crop false)",
    "beta": "DPO beta (default 2500 for SD1.5, 5000 for SDXL)",
    "lambda_stat": "weight of the statistic-matching loss (paper: 10000)",
    "eval_pairs": "pairs (the first N) whose reward margin is measured under fixed probes at the start, the end and every --eval-every steps (0: off)",
    "eval_every": "also evaluate every N steps (0: only at the start and the end)",
    "checkpoint_every": "save a resumable checkpoint every N steps",
    "keep_checkpoints": "how many checkpoints to keep",
    "log_every": "emit a progress event every N steps",
    "sample_every": "render validation images every N steps (0: never)",
    "sample_prompts": "validation prompts (repeat the flag or use the config file)",
    "sample_steps": "sampler steps of validation images",
    "max_nan_steps": "stop after this many consecutive non-finite losses",
    "lora_name": "file name of the exported LoRA",
}


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML or JSON file with any of the options below")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    defaults = TrainConfig()
    for name, spec in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        kwargs = dict(default=None, help=f"{HELP[name]} (default: {default!r})", dest=name)
        if spec.type in ("bool", bool):
            kwargs["type"] = _parse_bool
            kwargs["metavar"] = "BOOL"
        elif name == "target_modules":
            kwargs["type"] = lambda s: [x.strip() for x in s.split(",") if x.strip()]
        elif name == "sample_prompts":
            kwargs["action"] = "append"
        elif name == "weighting_options":
            kwargs["type"] = json.loads
        elif name in ("alpha", "beta", "lr", "weight_decay", "max_grad_norm", "flip_p", "lambda_stat"):
            kwargs["type"] = float
        elif isinstance(default, int) and not isinstance(default, bool):
            kwargs["type"] = int
        parser.add_argument(flag, **kwargs)


def read_config_file(path: Path) -> dict:
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}; known: {sorted(FIELDS)}")
    return data


def resolve(args: argparse.Namespace, method_defaults: dict | None = None) -> TrainConfig:
    values: dict = {}
    values.update(method_defaults or {})
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    for name in FIELDS:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    return TrainConfig(**values)
