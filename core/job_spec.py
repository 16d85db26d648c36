"""The job spec: what a ComfyUI Train node asks ``python -m trainers job`` to do.

One typed, versioned record, written by the node side (``nodes/train_lora.py`` builds it, the job
manager stores it as ``spec.json``) and read by the trainer side (``trainers/node_job.py``), which
refuses a spec of another version. Standard library only, relative imports: it is
``<pack>.core.job_spec`` inside ComfyUI and ``core.job_spec`` in the trainer process.

The trainer's options travel under ``TrainConfig``'s own field names (``trainers/config.py``) and
become ``train`` flags by ``flag``, the rule the command line itself is built with: a new option
needs no code here.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .fileio import write_json_atomic

SPEC_VERSION = 2  # 1: the untyped dict of before (lora_file / lora_dest / lora_name, build_pairs.scorer_models)

# What a resumed run may change (TrainConfig field names): how it is run and logged, not what it
# trains. The trainer's --resume and the job manager's check before a job starts both read it.
MAY_CHANGE_ON_RESUME = frozenset({
    "steps", "output", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "sample_prompts",
    "sample_steps", "eval_every", "max_nan_steps", "output_file", "tokenizer", "device",
})


class SpecError(ValueError):
    """A spec file that this version of the pack does not run; the message says why and what to do."""


def flag(name: str) -> str:
    """The command-line flag of an option: ``fair_every`` -> ``--fair-every``."""
    return "--" + name.replace("_", "-")


def flag_value(value) -> str:
    """An option's value as its flag takes it: true/false, a comma list, a JSON object."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def option_argv(options: dict) -> list[str]:
    """``--name value`` for each option that is set (not None)."""
    argv = []
    for name, value in options.items():
        if value is not None:
            argv += [flag(name), flag_value(value)]
    return argv


@dataclass(frozen=True)
class JobSpec:
    method: str  # a trainer method: fairhuman, fairhuman-controlnet, hg-dpo, fair-dpo
    base: str  # the base checkpoint's path, or a diffusion model's (Flux.1, SD3.5, Z-Image)
    output_file: str  # the trained file's name in the trainer's run directory (a LoRA or a ControlNet)
    output_listed: str  # its name in ComfyUI's list (``fairhuman/<name>.safetensors``)
    output_dest: str  # where the job copies it (a ComfyUI models folder)
    train: dict = field(default_factory=dict)  # TrainConfig field -> value
    text_encoders: list = field(default_factory=list)  # the base's text encoder files, where it needs them
    vae: str = ""  # the base's VAE file ("": the base's own)
    tokenizer: str = ""  # CLIP tokenizer folder ("" for the trainer's own search)
    dataset: str = ""  # photo methods: the folder of photos (annotated first when it has no metadata.jsonl)
    pairs: str = ""  # DPO methods: an existing pairs folder, else pairs are built from ``prompts``
    prompts: list = field(default_factory=list)
    build_pairs: dict = field(default_factory=dict)  # build-pairs options by their flags' names
    scorer_models: dict = field(default_factory=dict)  # scorer name -> its weights folder
    overwrite: bool = False  # replace an existing file at output_dest
    # the devices of a data-parallel job, one process each: "" (the job's one device), "cuda:0,1",
    # "all" (every GPU), "cpu,cpu" (two CPU processes); see ``device_list``
    devices: str = ""
    job_id: str = ""  # set by the job manager
    job_dir: str = ""
    version: int = SPEC_VERSION

    # ---- reading and writing ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_job(self, job_id: str, job_dir) -> "JobSpec":
        """The spec of one job: its id and folder, given by the job manager."""
        return dataclasses.replace(self, job_id=job_id, job_dir=str(job_dir))

    def write(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def from_dict(cls, data, source: str = "job spec") -> "JobSpec":
        """The spec in ``data``, or SpecError: another version, an unknown or missing field, a
        field of the wrong type."""
        if not isinstance(data, dict):
            raise SpecError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version != SPEC_VERSION:
            raise SpecError(f"{source} has version {version!r}; this version of the pack runs job specs of version "
                            f"{SPEC_VERSION}: queue the job again from its Train node (same output_name and settings "
                            f"to resume the run)")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise SpecError(f"{source}: unknown fields {unknown}; known: {sorted(fields)}")
        missing = sorted(n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if missing:
            raise SpecError(f"{source}: missing fields {missing}")
        for name, value in data.items():
            kind = _TYPES[str(fields[name].type)]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise SpecError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
        return cls(**data)

    @classmethod
    def read(cls, path: Path) -> "JobSpec":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SpecError(f"job spec {path} does not read: {err}") from None
        return cls.from_dict(data, source=f"job spec {path}")

    # ---- what the job runs ------------------------------------------------------------------------
    def base_argv(self) -> list[str]:
        """The flags naming the base model's files, as ``train`` and ``build-pairs`` take them (the
        text encoders space-separated: a path may hold a comma)."""
        argv = option_argv({"base": self.base, "vae": self.vae or None, "tokenizer": self.tokenizer or None})
        return argv + ([flag("text_encoders"), *self.text_encoders] if self.text_encoders else [])

    def train_argv(self, data: Path, run_dir: Path) -> list[str]:
        """``python -m trainers train`` arguments: the spec's own, then each trainer option."""
        fixed = {"method": self.method, "data": str(data), "output": str(run_dir), "output_file": self.output_file}
        overlap = sorted((set(fixed) | {"base", "text_encoders", "vae", "tokenizer"}) & set(self.train))
        if overlap:
            raise SpecError(f"job spec: train options {overlap} are the spec's own fields")
        return ["train", *option_argv({**fixed, **self.train}), *self.base_argv()]

    def build_pairs_argv(self, prompts_file: Path, out: Path) -> list[str]:
        """``python -m trainers build-pairs`` arguments for pairs from ``prompts``."""
        fixed = {"prompts": str(prompts_file), "output": str(out)}
        argv = ["build-pairs", *option_argv({**fixed, **self.build_pairs}), *self.base_argv()]
        for name, folder in self.scorer_models.items():
            argv += [flag("scorer_model"), f"{name}={folder}"]
        return argv


class DevicesError(ValueError):
    """A ``devices`` value that names no device list."""


_DEVICE_ITEM = re.compile(r"^(cpu|cuda(?::(\d+))?|(\d+))$")


def device_list(devices: str, default: str, gpus: int) -> list[str]:
    """The devices a job runs on, one process each: ``devices`` ("" for ``[default]``; "all" for
    every one of the ``gpus`` GPUs, else the default; "cuda:0,1" / "cuda:0,cuda:1" / "0,1"; "cpu,cpu"
    for two CPU processes). A GPU named twice, or GPUs and the CPU together, are refused."""
    text = (devices or "").strip().lower()
    if not text:
        return [default]
    if text == "all":
        return [f"cuda:{i}" for i in range(gpus)] or [default]
    found = []
    for item in (part.strip() for part in text.split(",")):
        match = _DEVICE_ITEM.match(item)
        if not match:
            raise DevicesError(f"devices {devices!r}: {item!r} is not a device; use e.g. cuda:0,1 (GPUs 0 and 1), "
                               f"all (every GPU), cpu,cpu (two CPU processes), or leave it empty for one device")
        found.append("cpu" if item == "cpu" else f"cuda:{match[2] or match[3] or 0}")
    gpus_named = [d for d in found if d != "cpu"]
    if gpus_named and len(gpus_named) != len(found):
        raise DevicesError(f"devices {devices!r}: GPUs and the CPU in one job; name GPUs only or cpu only")
    if len(set(gpus_named)) != len(gpus_named):
        raise DevicesError(f"devices {devices!r}: a GPU named twice; one process per GPU")
    return found


_TYPES = {"str": str, "dict": dict, "list": list, "bool": bool, "int": int}


def settings_differences(old: dict, new: dict) -> list[str]:
    """``name: old -> new`` for every setting of a run that differs, except those a resumed run
    may change."""
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if key not in MAY_CHANGE_ON_RESUME and old.get(key) != new.get(key)]
