"""The job spec between the Train nodes and ``python -m trainers job`` (core/job_spec.py): what a
node's inputs become, through the spec file and the trainer's argv, is the configuration the
command line gives for the same settings; a spec of another version is refused; the node inputs
that saved workflows fill still exist, in order. The nodes run here without ComfyUI: its
functions the node calls are stubbed, the node's own code is not."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from comfyui_harness import workflow_to_api
from train_helpers import ROOT, import_pack, offline_env

from core.job_spec import SPEC_VERSION, JobSpec, SpecError
from core.scorers import NAMES as SCORERS
from core.weighting import WEIGHTINGS
from trainers.cli import build_parser, load_command
from trainers.config import TrainConfig, resolve, validate
from trainers.methods import METHODS, method_module

SAVED_BY = "1c30921"  # the main whose saved workflows must keep loading
BASE, TOKENIZER = "tiny-sd15", "/comfy/sd1_tokenizer"


@pytest.fixture(scope="module")
def node_modules():
    return import_pack("nodes.train_lora"), import_pack("nodes.train_inputs")


class _Manager:
    """The job manager's surface the node uses; keeps what was submitted."""

    def __init__(self):
        self.submitted = []

    def check(self, **_):
        pass

    def submit(self, spec, **record):
        self.submitted.append((spec, record))
        return types.SimpleNamespace(id="0123456789ab", dir=Path("/runs") / record["name"])


@pytest.fixture
def comfy(node_modules, tmp_path, monkeypatch):
    """ComfyUI's side stubbed: an input folder with a dataset, models folders in tmp_path, a
    manager that records the submitted spec. Returns (input dir, manager)."""
    train_lora, _ = node_modules
    input_dir = tmp_path / "input"
    for name in ("fairhuman_photos", "photos"):
        (input_dir / name).mkdir(parents=True)
        (input_dir / name / "a.png").write_bytes(b"png")
    folder_paths = types.SimpleNamespace(
        get_input_directory=lambda: str(input_dir), models_dir=str(tmp_path / "models"),
        get_folder_paths=lambda kind: [str(tmp_path / "models" / kind)], get_filename_list=lambda kind: [])
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    blocker = types.SimpleNamespace(ExecutionBlocker=lambda message: None)  # background ControlNet's output
    monkeypatch.setitem(sys.modules, "comfy_execution", types.SimpleNamespace(graph_utils=blocker))
    monkeypatch.setitem(sys.modules, "comfy_execution.graph_utils", blocker)
    manager = _Manager()
    monkeypatch.setattr(train_lora, "comfy_manager", lambda: manager)
    # a checkpoint resolves to the tiny base; other model files to their place in a ComfyUI tree
    monkeypatch.setattr(train_lora, "model_file",
                        lambda kind, name: BASE if kind == "checkpoints" else f"/comfy/models/{kind}/{name}")
    monkeypatch.setattr(train_lora, "comfy_tokenizer", lambda: TOKENIZER)
    monkeypatch.setattr(train_lora, "training_device", lambda requested: requested or "cpu")
    return input_dir, manager


def _node_spec(node_modules, comfy, tmp_path, node_id: str, **values) -> JobSpec:
    """What the node submits for these inputs, through its spec file, as the job reads it."""
    train_lora, _ = node_modules
    _, manager = comfy
    train_lora.NODE_CLASS_MAPPINGS[node_id]().train(mode="background", **values)
    spec, record = manager.submitted[-1]
    assert record["device"] == spec.train["device"]
    path = tmp_path / f"spec{len(manager.submitted)}.json"
    spec.write(path)
    return JobSpec.read(path)


def _config(argv: list[str]) -> TrainConfig:
    """The configuration ``python -m trainers train ARGV`` resolves (before it checks files)."""
    args = build_parser("train", load_command("train")).parse_args(argv)
    return resolve(args, method_module(args.method).METHOD.defaults)


# ---- the round trip -------------------------------------------------------------------------------
def test_fairhuman_lora_node_to_trainer_config_equals_the_cli(node_modules, comfy, tmp_path):
    input_dir, _ = comfy
    spec = _node_spec(node_modules, comfy, tmp_path, "FairHumanTrainLoRA", ckpt_name="base.safetensors",
                      dataset="photos", output_name="hands", steps=7, resolution=128, rank=4, learning_rate=3e-4,
                      weighting="dwa", normalization="area", batch_size=2, gradient_accumulation=3,
                      mixed_precision="bf16", gradient_checkpointing=True, seed=5, checkpoint_every=2, device="cpu",
                      fair_every=4)
    data, run = input_dir / "photos", tmp_path / "run"
    assert spec.version == SPEC_VERSION and spec.method == "fairhuman" and spec.dataset == str(data.resolve())
    from_node = _config(spec.train_argv(Path(spec.dataset), run)[1:])
    # the same settings as someone types them (the flags' old spellings, as the README gives them)
    from_cli = _config(["--method", "fairhuman", "--base", BASE, "--data", str(data.resolve()), "--output", str(run),
                        "--lora-name", "hands.safetensors", "--tokenizer", TOKENIZER, "--steps", "7",
                        "--resolution", "128", "--rank", "4", "--lr", "3e-4", "--weighting", "dwa",
                        "--normalization", "area", "--batch-size", "2", "--grad-accum", "3",
                        "--mixed-precision", "bf16", "--gradient-checkpointing", "true", "--seed", "5",
                        "--checkpoint-every", "2", "--device", "cpu", "--fair-every", "4"])
    assert from_node == from_cli
    assert (from_node.fair_every, from_node.lr, from_node.grad_accum) == (4, 3e-4, 3)  # not the defaults


def _non_default(declaration):
    """A value of an input other than its default, inside its range."""
    kind, options = declaration
    default = options.get("default")
    if isinstance(kind, list):
        return next(c for c in kind if c != default)
    if kind == "BOOLEAN":
        return not default
    if kind == "INT":
        step = options.get("step", 1)
        return default + step if default + step <= options.get("max", default + step) else default - step
    if kind == "FLOAT":
        return round(min(default * 2 if default else 0.5, options.get("max", 1.0)), 9)
    raise AssertionError(kind)


@pytest.mark.parametrize("node_id", ["FairHumanTrainLoRA", "FairHumanTrainControlNet", "HGDPOTrainLoRA"])
def test_every_trainer_option_of_a_node_reaches_the_trainer_config(node_modules, comfy, tmp_path, node_id):
    train_lora, _ = node_modules
    inputs = train_lora.NODE_CLASS_MAPPINGS[node_id].INPUTS
    declared = {**inputs["required"], **inputs["optional"]}
    options = {name: i for name, i in declared.items() if i.field}
    assert {"steps", "resolution", "learning_rate", "seed", "gradient_accumulation"} <= set(options)
    values = {name: _non_default(i.declaration([])) for name, i in options.items()}
    values["mixed_precision"] = "bf16"  # fp16 is refused on the CPU
    spec = _node_spec(node_modules, comfy, tmp_path, node_id, ckpt_name="base.safetensors", output_name="x",
                      device="cpu", **({"prompts": "a person waving\n"} if node_id == "HGDPOTrainLoRA"
                                       else {"dataset": "photos"}), **values)
    cfg = _config(spec.train_argv(tmp_path, tmp_path / "run")[1:])
    for name, value in values.items():
        assert getattr(cfg, options[name].field) == value, name
    assert cfg.method == train_lora.NODE_CLASS_MAPPINGS[node_id]().method({"method": "hg-dpo"})
    assert set(spec.train) - {"device"} <= set(TrainConfig.__dataclass_fields__)


def test_hgdpo_node_builds_pairs_with_its_inputs(node_modules, comfy, tmp_path):
    from trainers.build_pairs import resolve_options

    spec = _node_spec(node_modules, comfy, tmp_path, "HGDPOTrainLoRA", ckpt_name="base.safetensors",
                      prompts="a person waving\n\ntwo friends\n", images_per_prompt=6, scorer="anatomy",
                      output_name="dpo", steps=3, resolution=256, sampling_steps=9, seed=11, method="fair-dpo",
                      mixed_precision="bf16")
    assert spec.method == "fair-dpo" and spec.prompts == ["a person waving", "two friends"] and not spec.pairs
    argv = spec.build_pairs_argv(tmp_path / "prompts.txt", tmp_path / "pairs")
    args = resolve_options(build_parser("build-pairs", load_command("build-pairs")).parse_args(argv[1:]))
    assert (args.n, args.scorer, args.size, args.steps, args.seed, args.base, args.tokenizer) == (
        6, "anatomy", (256, 256), 9, 11, BASE, TOKENIZER)


DIT_INPUTS = {"diffusion_model": "flux1-dev.safetensors", "text_encoder_1": "t5xxl_fp16.safetensors",
              "text_encoder_3": "clip_l.safetensors", "vae": "ae.safetensors"}


def _in_tree(kind: str, name: str) -> str:
    return f"/comfy/models/{kind}/{name}"


@pytest.mark.parametrize("node_id", ["FairHumanTrainLoRA", "HGDPOTrainLoRA"])
def test_a_diffusion_model_base_reaches_the_trainer_with_its_text_encoders_and_vae(node_modules, comfy, tmp_path,
                                                                                    node_id):
    from trainers.build_pairs import resolve_options

    data = {"prompts": "a person waving\n"} if node_id == "HGDPOTrainLoRA" else {"dataset": "photos"}
    spec = _node_spec(node_modules, comfy, tmp_path, node_id, ckpt_name="base.safetensors", output_name="flux",
                      device="cpu", **data, **DIT_INPUTS)
    base = _in_tree("diffusion_models", "flux1-dev.safetensors")
    encoders = [_in_tree("text_encoders", "t5xxl_fp16.safetensors"), _in_tree("text_encoders", "clip_l.safetensors")]
    vae = _in_tree("vae", "ae.safetensors")
    assert (spec.base, spec.text_encoders, spec.vae) == (base, encoders, vae)  # ckpt_name is ignored
    cfg = _config(spec.train_argv(tmp_path, tmp_path / "run")[1:])
    assert (cfg.base, cfg.text_encoders, cfg.vae) == (base, encoders, vae)
    if node_id == "HGDPOTrainLoRA":
        argv = spec.build_pairs_argv(tmp_path / "prompts.txt", tmp_path / "pairs")
        args = resolve_options(build_parser("build-pairs", load_command("build-pairs")).parse_args(argv[1:]))
        assert (args.base, args.text_encoders, args.vae) == (base, encoders, vae)
    # the run's settings name the diffusion model, not the ignored checkpoint (changing it resumes)
    _, manager = comfy
    settings = manager.submitted[-1][1]["settings"]
    assert settings["diffusion_model"] == DIT_INPUTS["diffusion_model"] and "ckpt_name" not in settings
    assert settings["text_encoders"] == ["t5xxl_fp16.safetensors", "clip_l.safetensors"]


def test_a_checkpoint_base_keeps_the_settings_of_runs_queued_before_the_diffusion_model_inputs(node_modules, comfy,
                                                                                              tmp_path):
    _node_spec(node_modules, comfy, tmp_path, "FairHumanTrainLoRA", ckpt_name="base.safetensors", output_name="x",
               dataset="photos", device="cpu")
    _, manager = comfy
    spec, record = manager.submitted[-1]
    assert (spec.text_encoders, spec.vae) == ([], "")
    assert not {"diffusion_model", "text_encoders", "vae"} & set(record["settings"])
    assert "--text-encoders" not in spec.train_argv(tmp_path, tmp_path / "run")


def test_no_base_at_all_is_refused(node_modules, comfy, tmp_path):
    train_lora, _ = node_modules
    with pytest.raises(ValueError, match="no base model: choose a checkpoint in ckpt_name, or a diffusion model"):
        train_lora.NODE_CLASS_MAPPINGS["FairHumanTrainLoRA"]().train(
            mode="background", ckpt_name="none", dataset="photos", output_name="x", device="cpu")


# ---- versions and malformed specs -----------------------------------------------------------------
def _spec(**fields) -> JobSpec:
    return JobSpec(method="fairhuman", base=BASE, output_file="x.safetensors", output_listed="fairhuman/x.safetensors",
                   output_dest="/models/loras/fairhuman/x.safetensors", **fields)


def test_a_spec_of_another_version_is_refused_with_a_message(tmp_path):
    data = {**_spec().to_dict(), "version": SPEC_VERSION - 1}
    with pytest.raises(SpecError, match=rf"has version {SPEC_VERSION - 1}; .* runs job specs of version "
                                        rf"{SPEC_VERSION}: queue the job again"):
        JobSpec.from_dict(data)
    del data["version"]
    with pytest.raises(SpecError, match="has version None"):
        JobSpec.from_dict(data)


@pytest.mark.parametrize("change,message", [
    ({"lora_file": "x.safetensors"}, r"unknown fields \['lora_file'\]"),
    ({"train": [1]}, "train must be dict"),
    ({"overwrite": "yes"}, "overwrite must be bool"),
    ({"version": True}, "has version True"),
])
def test_a_malformed_spec_is_refused_naming_the_field(change, message):
    with pytest.raises(SpecError, match=message):
        JobSpec.from_dict({**_spec().to_dict(), **change})
    data = _spec().to_dict()
    del data["method"]
    with pytest.raises(SpecError, match=r"missing fields \['method'\]"):
        JobSpec.from_dict(data)


def test_trainer_options_may_not_override_the_specs_own_fields():
    with pytest.raises(SpecError, match=r"\['output'\]"):
        _spec(train={"output": "/elsewhere"}).train_argv(Path("data"), Path("run"))


def test_the_job_command_refuses_an_old_spec_in_the_jobs_events(tmp_path):
    """A version-1 spec (today's main wrote these) run as a job: exit 2, the reason in its events."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    old = {"version": 1, "method": "fairhuman", "base": BASE, "dataset": str(tmp_path), "lora_file": "x.safetensors",
           "lora_name": "fairhuman/x.safetensors", "lora_dest": str(tmp_path / "x.safetensors"), "overwrite": False,
           "train": {"steps": 1}, "job_id": "0123456789ab", "job_dir": str(job_dir)}
    (job_dir / "spec.json").write_text(json.dumps(old))
    done = subprocess.run([sys.executable, "-m", "trainers", "job", str(job_dir / "spec.json")], cwd=ROOT,
                          env=offline_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "has version 1" in done.stderr
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["error"] and "queue the job again" in events[0]["message"]
    assert not (job_dir / "train").exists()


# ---- choices from the registries ------------------------------------------------------------------
def test_node_choices_are_the_registries(node_modules):
    train_lora, train_inputs = node_modules
    for node_id, node in train_lora.NODE_CLASS_MAPPINGS.items():
        declared = {**node.INPUTS["required"], **node.INPUTS["optional"]}
        if "weighting" in declared:
            assert declared["weighting"].kind == list(WEIGHTINGS), node_id
            assert all(w in declared["weighting"].options["tooltip"] for w in WEIGHTINGS), node_id
    hg = {**train_inputs.HGDPO_LORA["required"], **train_inputs.HGDPO_LORA["optional"]}
    assert hg["scorer"].kind == list(SCORERS)
    assert set(hg["method"].kind) <= set(METHODS)
    assert {node.METHOD for node in train_lora.NODE_CLASS_MAPPINGS.values()} <= set(METHODS)


# ---- saved workflows ------------------------------------------------------------------------------
def _saved_workflows() -> list[tuple[str, dict, bool]]:
    """(name, workflow, saved by SAVED_BY) for the workflows main saved at SAVED_BY (from git, when
    the history is here) and those in workflows/ now."""
    found = [(f"workflows/{p.name}", json.loads(p.read_text()), False)
             for p in sorted((ROOT / "workflows").glob("*.json"))]
    listing = subprocess.run(["git", "ls-tree", "--name-only", SAVED_BY, "workflows/"], cwd=ROOT,
                             capture_output=True, text=True)
    for name in listing.stdout.split() if listing.returncode == 0 else []:
        if name.endswith(".json"):
            shown = subprocess.run(["git", "show", f"{SAVED_BY}:{name}"], cwd=ROOT, check=True, capture_output=True,
                                   text=True)
            found.append((f"{SAVED_BY}:{name}", json.loads(shown.stdout), True))
    return found


# The Train nodes' inputs, in order, as main declared them at SAVED_BY: a saved workflow stores
# widget values by position, so these stay where they are (new inputs may follow at the end).
RELEASED_INPUTS = {
    "FairHumanTrainLoRA": [
        "ckpt_name", "dataset", "output_name", "steps", "resolution", "rank", "learning_rate", "weighting", "mode",
        "normalization", "batch_size", "gradient_accumulation", "mixed_precision", "gradient_checkpointing", "seed",
        "checkpoint_every", "device", "overwrite", "model", "strength", "fair_every"],
    "FairHumanTrainControlNet": [
        "ckpt_name", "dataset", "output_name", "steps", "resolution", "learning_rate", "weighting", "mode",
        "condition_dropout", "normalization", "batch_size", "gradient_accumulation", "mixed_precision",
        "gradient_checkpointing", "seed", "checkpoint_every", "device", "overwrite", "fair_every"],
    "HGDPOTrainLoRA": [
        "ckpt_name", "prompts", "images_per_prompt", "scorer", "output_name", "steps", "mode", "pairs", "resolution",
        "rank", "learning_rate", "sampling_steps", "batch_size", "gradient_accumulation", "mixed_precision",
        "gradient_checkpointing", "seed", "checkpoint_every", "device", "overwrite", "model", "strength", "method"],
}


def test_released_inputs_keep_their_names_and_places(node_modules):
    train_lora, _ = node_modules
    assert set(train_lora.NODE_CLASS_MAPPINGS) == set(RELEASED_INPUTS)
    for node_id, names in RELEASED_INPUTS.items():
        inputs = train_lora.NODE_CLASS_MAPPINGS[node_id].INPUTS
        declared = [*inputs["required"], *inputs["optional"]]
        assert declared[:len(names)] == names, node_id
        assert set(inputs["required"]) <= set(names), f"{node_id}: a new input must be optional"


ANY_FILE = "<any model file>"  # the models folders' file list here: any name a saved workflow holds


def _fits(declaration, value) -> bool:
    kind, options = declaration
    if isinstance(kind, list):
        return isinstance(value, str) and (ANY_FILE in kind or value in kind)
    if kind in ("INT", "FLOAT"):
        return isinstance(value, (int, float)) and options.get("min", value) <= value <= options.get("max", value)
    return isinstance(value, {"BOOLEAN": bool, "STRING": str}[kind])


def test_saved_workflows_still_map_onto_the_node_inputs(node_modules, comfy, tmp_path):
    """Every widget value of a saved Train node lands, in order, on an input of the same kind that
    takes it; the node then turns the values saved by SAVED_BY into a spec the trainer accepts."""
    train_lora, train_inputs = node_modules
    _, manager = comfy
    object_info = {node_id: {"input": train_inputs.input_types(node.INPUTS, lambda folder: [ANY_FILE])}
                   for node_id, node in train_lora.NODE_CLASS_MAPPINGS.items()}
    seen = 0
    for name, workflow, released in _saved_workflows():
        trains = [n for n in workflow["nodes"] if n["type"] in object_info]
        api = workflow_to_api({"nodes": trains, "links": workflow["links"]}, object_info)
        for node in trains:
            seen += 1
            declared = {**object_info[node["type"]]["input"]["required"],
                        **object_info[node["type"]]["input"]["optional"]}
            inputs = api[str(node["id"])]["inputs"]
            widgets = {k: v for k, v in inputs.items() if not isinstance(v, list)}
            assert len(widgets) == len(node["widgets_values"]), (name, node["type"])
            for key, value in widgets.items():
                assert _fits(declared[key], value), (name, node["type"], key, value)
            if not released:
                continue
            linked = {k: None for k, v in inputs.items() if isinstance(v, list)}  # e.g. a MODEL socket
            train_lora.NODE_CLASS_MAPPINGS[node["type"]]().train(**{**widgets, **linked, "mode": "background",
                                                                     "mixed_precision": "bf16"})
            spec = JobSpec.from_dict(json.loads(json.dumps(manager.submitted[-1][0].to_dict())))
            validate(_config(spec.train_argv(tmp_path, tmp_path / "run")[1:]))
    assert seen >= 3  # the three Train nodes' workflows


# ---- devices (issue 24): a job on several devices ----------------------------------------------
def test_devices_name_one_process_per_device():
    from core.job_spec import device_list

    assert device_list("", "cuda:1", 2) == ["cuda:1"]
    assert device_list("cuda:0,1", "cpu", 2) == device_list("cuda:0, cuda:1", "cpu", 2) == ["cuda:0", "cuda:1"]
    assert device_list("all", "cuda:0", 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert device_list("all", "cpu", 0) == ["cpu"]  # no GPU: the job's one device
    assert device_list("cpu,cpu", "cpu", 0) == ["cpu", "cpu"]


@pytest.mark.parametrize("bad, message", [("cuda:0,0", "a GPU named twice"), ("cpu,cuda:1", "GPUs and the CPU"),
                                          ("gpu0", "'gpu0' is not a device")])
def test_devices_that_name_no_device_list_are_refused(bad, message):
    from core.job_spec import DevicesError, device_list

    with pytest.raises(DevicesError, match=message):
        device_list(bad, "cpu", 2)


def test_a_spec_keeps_its_devices_and_older_specs_read_without_them(tmp_path):
    spec = JobSpec(method="fairhuman", base="b", output_file="x.safetensors", output_listed="fairhuman/x.safetensors",
                   output_dest=str(tmp_path / "x.safetensors"), devices="cuda:0,1")
    spec.write(tmp_path / "spec.json")
    assert JobSpec.read(tmp_path / "spec.json").devices == "cuda:0,1"
    data = spec.to_dict()
    del data["devices"]
    assert JobSpec.from_dict(data).devices == ""
