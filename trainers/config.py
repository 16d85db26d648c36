"""Training configuration: one dataclass, filled from defaults, a YAML/JSON file and flags.

Precedence: command-line flag > config file > method default > field default. The resolved
configuration is written into the run directory (``config.json``) and is what ``--resume``
reloads, so a resumed run cannot silently change its recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.job_spec import flag

# The UNet modules that get LoRA by default: the attention linears (HG-DPO's paper; FairHuman's code).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class TrainConfig:
    method: str = "fairhuman"
    base: str = "tiny-sdxl"
    preset: str = ""  # "paper": every setting the paper states (trainers/presets.py)
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
    target_modules: list = field(default_factory=lambda: list(LORA_TARGETS))
    mixed_precision: str = "no"  # no | fp16 | bf16 | auto (trainers.precision.compute_dtype)
    device: str = ""  # "": cuda if available else cpu
    gradient_checkpointing: bool = False
    # fitting a GPU (docs/memory.md)
    base_weights: str = "compute"  # compute | fp8 (trainers.precision)
    unload_text_encoders: bool = False
    seed: int = 0
    # FairHuman
    weighting: str = "mpd"
    weighting_options: dict = field(default_factory=dict)
    normalization: str = "reference"  # reference | area
    local_scale: float = 5.0  # reference normalization: 1 = the paper's Eq. 2, 5 = the release code
    batched_vjp: bool = True
    fair_every: int = 1
    match_norm: bool = False
    tokenizer: str = ""
    text_encoders: list = field(default_factory=list)  # a Flux.1 / SD3.5 / Z-Image diffusion model's (ComfyUI's files)
    vae: str = ""
    random_crop: bool = True
    flip_p: float = 0.5
    bucketing: bool = True
    cache_latents: bool = False
    # FairHuman ControlNet
    condition_dropout: float = 0.3
    conditioning_scale: float = 1.0
    # HG-DPO
    beta: float | None = None  # None: method default by architecture
    lambda_stat: float = 10000.0
    stat_reduction: str = "channel-mean"  # channel-mean | squared-norm (Eq. 8 literally)
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
    # best LoRA by face and hand quality (trainers/validation.py)
    validate_every: int = 0
    validation_prompts: list = field(default_factory=list)  # empty: validation.DEFAULT_PROMPTS
    validation_seeds: int = 2
    validation_metric: str = "face-hand"  # face-hand | face | hand | scorer
    validation_scorer: str = ""
    validation_scorer_model: str = ""
    output_file: str = ""  # file name of the trained LoRA or ControlNet; default <method>_<base arch>.safetensors

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

HELP = {
    "method": "fairhuman (MPD-fair global/face/hand losses), hg-dpo (Diffusion-DPO + statistic matching) or "
              "fair-dpo (Diffusion-DPO over the whole image, the faces and the hands, MPD-fair)",
    "base": "tiny-sd15, tiny-sdxl, tiny-flux, tiny-zimage, tiny-sd3, a single-file checkpoint (.safetensors, SD1.5 or SDXL), "
            "a Flux.1, SD3.5 or Z-Image diffusion model file (with --text-encoders and --vae) or a diffusers folder",
    "data": "dataset folder: annotated images (fairhuman) or a pairs folder from build-pairs (hg-dpo, fair-dpo)",
    "output": "run directory (config, events.jsonl, checkpoints, samples, the LoRA)",
    "steps": "optimizer steps",
    "resolution": "training side in pixels (buckets keep about resolution² pixels); hg-dpo: a cap, each pair "
                  "trains at its own size up to about resolution² pixels",
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
    "target_modules": "denoiser module names that get LoRA (comma-separated); on Flux and SD3 each attention name also "
                      "covers its text-stream twin (to_q: add_q_proj, to_out.0: to_add_out, ...)",
    "mixed_precision": "compute dtype of the UNet forward (autocast): no, fp16 (with loss scaling), bf16, or auto "
                       "(bf16 on a GPU that has it, else fp16 on a GPU, no on a CPU); trainable parameters, optimizer "
                       "state and the VAE stay fp32; fp16 and bf16 run on the CPU too, slowly",
    "device": "training device, e.g. cuda, cuda:1 or cpu ('': cuda if available, else cpu; under a multi-process "
              "launcher each process uses cuda:LOCAL_RANK)",
    "gradient_checkpointing": "trade compute for activation memory",
    "base_weights": "storage of the frozen denoiser's weights: compute (the compute dtype) or fp8 (float8_e4m3fn, "
                    "upcast per layer to the compute dtype; norms and embeddings stay; needs --gradient-checkpointing "
                    "true; LoRA only): about half the memory of bf16 weights",
    "unload_text_encoders": "encode every caption (and sample/validation prompt) before the first step into the run "
                            "directory, then drop the text encoders: training and a resumed run read the embeddings",
    "seed": "seed of data order, augmentation, noise and timesteps",
    "weighting": "mpd, mpd-closed-form, ls, dwa, uw, rlw, si, nash-mtl",
    "weighting_options": "JSON object of weighting options, e.g. '{\"alpha\": 2}'",
    "preset": "paper: every setting the method's paper states (README, Paper fidelity); flags still override it",
    "normalization": "masked-loss normalization: reference (FairHuman code) or area",
    "local_scale": "reference normalization's scale inside the square: 1 = the FairHuman paper's Eq. 2, "
                   "5 = the release code (25 × Eq. 2)",
    "fair_every": "solve the fair weights every N steps; in between, one backward of the weighted sum with the last weights (cost of a plain step; 1: every step)",
    "match_norm": "rescale the fair combined update to the norm of the plain summed loss's update (direction unchanged): "
                  "compares weightings at the same step size",
    "batched_vjp": "objective gradients by one batched vector-Jacobian product (faster) or K backward passes (less transient memory)",
    "tokenizer": "folder with CLIP's vocab.json and merges.txt, for single-file checkpoints outside a ComfyUI tree",
    "text_encoders": "with a Flux.1, SD3.5 or Z-Image diffusion model as --base: its text encoder files from ComfyUI's "
                     "models/text_encoders (Flux: CLIP-L and T5-XXL; SD3.5: CLIP-L, CLIP-G and T5-XXL unless the "
                     "checkpoint holds them; Z-Image: Qwen3-4B), in any order",
    "vae": "with a Flux.1, SD3.5 or Z-Image diffusion model as --base: its VAE file from ComfyUI's models/vae "
           "(Flux and Z-Image: ae.safetensors)",
    "random_crop": "random crops (else centred)",
    "flip_p": "probability of a horizontal flip",
    "bucketing": "aspect-ratio buckets (else square crops)",
    "cache_latents": "keep each image view's VAE latent in the run directory (needs --random-crop false)",
    "condition_dropout": "fairhuman-controlnet: probability that a sample's condition image is dropped (black) in a step (paper: 0.3)",
    "conditioning_scale": "fairhuman-controlnet: scale of the ControlNet's residuals while training",
    "beta": "DPO beta (default 2500 for SD1.5, 5000 for SDXL)",
    "lambda_stat": "weight of the statistic-matching loss (paper: 10000)",
    "stat_reduction": "statistic loss over the latent channels: channel-mean (the squared differences averaged) "
                      "or squared-norm (summed: Eq. 8 literally, 4 × channel-mean)",
    "eval_pairs": "pairs (the first N) whose reward margin is measured under fixed probes at the start, the end and every --eval-every steps (0: off)",
    "eval_every": "also evaluate every N steps (0: only at the start and the end)",
    "checkpoint_every": "save a resumable checkpoint every N steps",
    "keep_checkpoints": "how many checkpoints to keep",
    "log_every": "emit a progress event every N steps",
    "sample_every": "render sample images of --sample-prompts every N steps (0: never)",
    "sample_prompts": "sample prompts (repeat the flag or use the config file)",
    "sample_steps": "sampler steps of sample and validation images",
    "max_nan_steps": "stop after this many consecutive non-finite losses",
    "output_file": "file name of the trained LoRA (or ControlNet) in --output (--lora-name: its former name)",
    "validate_every": "every N steps and at the end, render the validation prompts with the current LoRA, score them "
                      "(Face/Hand Confi.) and keep the best LoRA as <lora name>_best.safetensors (0: never)",
    "validation_prompts": "validation prompts (repeat the flag or use the config file; default: four prompts of "
                          "people with faces and hands)",
    "validation_seeds": "images per validation prompt (seeds seed, seed+1, ...)",
    "validation_metric": "what the best LoRA maximizes: face-hand (mean of Face and Hand Confi., a missed face or hand "
                         "counting 0), face, hand, or scorer (the mean of --validation-scorer)",
    "validation_scorer": "also score validation images with this scorer: anatomy, or pickscore, hps, imagereward, "
                         "clipscore with --validation-scorer-model",
    "validation_scorer_model": "local weights folder of a model-based --validation-scorer",
}


class ConfigError(ValueError):
    """A bad option, refused before anything loads; the message names the option and the fix."""


def _parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_list(value) -> list:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [x.strip() for x in str(value).split(",") if x.strip()]


def _parse_dict(value) -> dict:
    data = json.loads(value) if isinstance(value, str) else value
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {value!r}")
    return data


def _parse_number(kind):
    def parse(value):
        if isinstance(value, bool):  # YAML's true is not a number
            raise ValueError(f"expected a number, got {value!r}")
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"expected a whole number, got {value!r}")
            return int(value)
        return kind(value)

    return parse


def _parser_for(annotation: str):
    """The parser of a field, from its annotation: ``int``, ``float | None``, ``bool``, ``list``,
    ``dict``, ``str``. ``X | None`` also takes ``none``."""
    kinds = [k.strip() for k in annotation.split("|")]
    optional = "None" in kinds
    kind = next(k for k in kinds if k != "None")
    base = {"int": _parse_number(int), "float": _parse_number(float), "bool": _parse_bool,
            "list": _parse_list, "dict": _parse_dict, "str": str}[kind]
    if not optional:
        return base

    def parse(value):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return base(value)

    return parse


PARSERS = {name: _parser_for(str(spec.type)) for name, spec in FIELDS.items()}
# prompts hold commas: a config file's string is one prompt, a list is several
PARSERS["sample_prompts"] = lambda v: [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
PARSERS["validation_prompts"] = PARSERS["sample_prompts"]


def parse_value(name: str, value, source: str = "option"):
    """``value`` converted to the type of field ``name``; a ConfigError naming it otherwise."""
    try:
        return PARSERS[name](value)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{flag(name)} ({source}): {err}") from None


def _argparse_type(name: str):
    def convert(text):
        try:
            return PARSERS[name](text)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = str(FIELDS[name].type).split("|")[0].strip()  # argparse names it in errors
    return convert


# Options renamed since runs were saved: config files and run folders that use the old name still read.
FORMER_NAMES = {"lora_name": "output_file"}


def current_names(values: dict) -> dict:
    """A saved or written configuration's keys under today's option names."""
    return {FORMER_NAMES.get(k, k): v for k, v in values.items()}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML or JSON file with any of the options below")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its last checkpoint (a new run when there is none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in --output (its checkpoints, events and LoRA are deleted)")
    defaults = TrainConfig()
    for name, spec in FIELDS.items():
        default = getattr(defaults, name)
        kwargs = dict(default=None, help=f"{HELP.get(name, name)} (default: {default!r})", dest=name,
                      type=_argparse_type(name))
        if "bool" in str(spec.type):
            kwargs["metavar"] = "BOOL"
        if name in ("sample_prompts", "validation_prompts"):
            kwargs.update(action="append", type=str)
        if name == "text_encoders":
            kwargs.update(nargs="+", type=str, metavar="FILE")
        former = [flag(old) for old, new in FORMER_NAMES.items() if new == name]
        parser.add_argument(flag(name), *former, **kwargs)


def read_config_file(path: Path) -> dict:
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    data = current_names({k.replace("-", "_"): v for k, v in data.items()})
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown options {unknown}; known: {sorted(FIELDS)}")
    return {k: parse_value(k, v, source=str(path)) for k, v in data.items()}


def explicit_values(args: argparse.Namespace) -> dict:
    """The options the user gave: the config file's, then the flags' (flags win)."""
    values = dict(read_config_file(args.config)) if getattr(args, "config", None) else {}
    for name in FIELDS:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    return values


def resolve(args: argparse.Namespace, method_defaults: dict | None = None) -> TrainConfig:
    from .presets import preset_values

    given = explicit_values(args)
    preset = preset_values(given.get("preset", ""), given.get("method", TrainConfig.method))
    return TrainConfig(**{**(method_defaults or {}), **preset, **given})


# ---- validation: every rule checked before anything loads --------------------------------------
def at_least(low):
    return lambda v: None if v >= low else f"must be at least {low}"


def above(low):
    return lambda v: None if v > low else f"must be greater than {low}"


def between(low, high):
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def multiple_of(n):
    return lambda v: None if v > 0 and v % n == 0 else f"must be a positive multiple of {n}"


def one_of(options):
    def check(v):
        choices = options() if callable(options) else options
        return None if v in choices else f"must be one of {', '.join(sorted(choices))}"

    return check


def _weightings():
    from core.weighting import WEIGHTINGS

    return WEIGHTINGS


def _stat_reductions():
    from core.dpo import STAT_REDUCTIONS

    return STAT_REDUCTIONS


def _methods():
    from .methods import METHODS

    return METHODS


def _validation_metrics():
    from .validation import METRICS

    return METRICS


def _base_weights():
    from .precision import STORAGE_DTYPES

    return STORAGE_DTYPES


def _schedulers():
    from diffusers.optimization import SchedulerType

    return [t.value for t in SchedulerType]


def _file_name(v):
    if not v:
        return None
    if "/" in v or "\\" in v or v in (".", "..") or not v.endswith(".safetensors"):
        return "must be a plain file name ending in .safetensors (no folders)"
    return None


RULES = {
    "method": one_of(_methods),
    "steps": at_least(1),
    "resolution": multiple_of(8),
    "batch_size": at_least(1),
    "grad_accum": at_least(1),
    "lr": above(0),
    "lr_scheduler": one_of(_schedulers),
    "warmup_steps": at_least(0),
    "optimizer": one_of(("adamw", "adamw8bit", "auto")),
    "weight_decay": at_least(0),
    "max_grad_norm": at_least(0),
    "rank": at_least(1),
    "alpha": above(0),
    "target_modules": lambda v: None if v else "must name at least one module",
    "mixed_precision": one_of(("no", "fp16", "bf16", "auto")),
    "base_weights": one_of(_base_weights),
    "device": lambda v: None if re.fullmatch(r"(cpu|cuda(:\d+)?)?", v) else "must be cpu, cuda or cuda:N",
    "weighting": one_of(_weightings),
    "fair_every": at_least(1),
    "normalization": one_of(("reference", "area")),
    "local_scale": above(0),
    "stat_reduction": one_of(_stat_reductions),
    "flip_p": between(0, 1),
    "condition_dropout": between(0, 1),
    "conditioning_scale": above(0),
    "beta": above(0),
    "lambda_stat": at_least(0),
    "eval_pairs": at_least(0),
    "checkpoint_every": at_least(0),
    "keep_checkpoints": at_least(1),
    "log_every": at_least(1),
    "sample_every": at_least(0),
    "eval_every": at_least(0),
    "sample_steps": at_least(1),
    "max_nan_steps": at_least(1),
    "output_file": _file_name,
    "validate_every": at_least(0),
    "validation_seeds": at_least(1),
    "validation_metric": one_of(_validation_metrics),
    "text_encoders": lambda v: next((f"names a missing file {p!r}" for p in v if not Path(p).is_file()), None),
    "vae": lambda v: None if not v or Path(v).is_file() else "is not an existing file",
}


def validate(cfg: TrainConfig) -> None:
    """Refuse a configuration that cannot run, before any model loads: every problem, one line."""
    problems = []
    for name, check in RULES.items():
        value = getattr(cfg, name, None)
        if value is None:
            continue  # an optional value left to its default
        problem = check(value)
        if problem:
            problems.append(f"{flag(name)} {value!r} {problem}")
    from .presets import preset_problem

    from .validation import config_problems

    problems += config_problems(cfg)
    from .methods import METHODS, method_module
    from .precision import STORAGE_DTYPES, base_weights_problem

    if cfg.method in METHODS and cfg.base_weights in STORAGE_DTYPES:
        kind = getattr(method_module(cfg.method).METHOD, "trainable_kind", "lora")
        problem = base_weights_problem(cfg.base_weights, cfg.gradient_checkpointing, kind)
        if problem:
            problems.append(problem)
    if preset_problem(cfg.preset, cfg.method):
        problems.append(preset_problem(cfg.preset, cfg.method))
    from core.tiny_models import TINY_BASES

    if cfg.base not in TINY_BASES and not Path(cfg.base).exists():
        problems.append(f"--base {cfg.base!r} is neither {' nor '.join(TINY_BASES)} nor an existing file or folder")
    if not cfg.data:
        problems.append("--data is required: an annotated folder (fairhuman) or a pairs folder (hg-dpo)")
    elif not Path(cfg.data).is_dir():
        problems.append(f"--data {cfg.data!r} is not a folder")
    if problems:
        raise ConfigError("; ".join(problems))
