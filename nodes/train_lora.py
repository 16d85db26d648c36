"""Train FairHuman LoRA / Train FairHuman ControlNet / Train HG-DPO LoRA: the bundled trainers
as jobs, from a graph. What each node does, without ComfyUI's node API (``nodes/train_nodes.py``
declares the nodes and calls these; ``tests/test_job_spec.py`` runs them with ComfyUI stubbed).

The node checks every input before anything is written (dataset inside the allowed folders, or
the graph's images with matching captions and masks, a plain output name, no file of that name
unless ``overwrite``, the same settings when a run of that name exists, a free device), then hands
a spec to the job manager, which runs ``python -m trainers job`` in its own process. ``wait``
blocks the queue, drives the progress bar and turns a UI interrupt into SIGTERM (the trainer
checkpoints: resumable); ``background`` returns at once and the job goes on while the queue runs
other prompts.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..core.job_spec import JobSpec
from .graph_data import dataset_files, digest, graph_dataset, write_dataset
from .job_manager import comfy_manager
from .job_paths import OUTPUT_SUBFOLDER, InputRefused, model_file, resolve_dataset, resolve_folder, sanitize_output_name
from .train_inputs import (DPO_METHODS, FAIRHUMAN_CONTROLNET, FAIRHUMAN_LORA, HGDPO_LORA, MODES, NONE, TEXT_ENCODERS,
                           trainer_options, with_defaults)

log = logging.getLogger("fairhuman-hgdpo")

WAIT_POLL_S = 0.2
GRAPH_DATA_FOLDER = ".graph_data"  # under the runs folder: <runs>/.graph_data/<output_name> (no job's name)


# ---- ComfyUI facts ----------------------------------------------------------------------------
def base_files(values: dict) -> tuple[dict, dict]:
    """(the JobSpec fields naming the base's files, the same as settings of the run): ckpt_name's
    checkpoint, or ``diffusion_model``'s transformer; the text encoders and VAE chosen beside it."""
    dit = values.get("diffusion_model") or NONE
    if dit != NONE:
        base, settings = model_file("diffusion_models", dit), {"diffusion_model": dit}
    elif values["ckpt_name"] != NONE:
        base, settings = model_file("checkpoints", values["ckpt_name"]), {"ckpt_name": values["ckpt_name"]}
    else:
        raise InputRefused("no base model: choose a checkpoint in ckpt_name, or a diffusion model (Flux.1, SD3.5, "
                           "Z-Image) in diffusion_model with its text encoders and VAE")
    encoders = [values[n] for n in TEXT_ENCODERS if (values.get(n) or NONE) != NONE]
    vae = values.get("vae") or NONE
    fields = {"base": base, "text_encoders": [model_file("text_encoders", n) for n in encoders],
              "vae": "" if vae == NONE else model_file("vae", vae)}
    # only what is set, so the settings of a run queued before these inputs existed still match
    return fields, {**settings, **({"text_encoders": encoders} if encoders else {}),
                    **({"vae": vae} if vae != NONE else {})}


def comfy_tokenizer() -> str:
    """ComfyUI's own CLIP tokenizer folder (SD1.5's and SDXL's vocabulary), so that no user
    passes one to the trainer."""
    import comfy.sd1_clip  # comfy is a namespace package: locate it through a module in it

    folder = Path(comfy.sd1_clip.__file__).resolve().parent / "sd1_tokenizer"
    return str(folder) if (folder / "vocab.json").is_file() else ""


DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def training_device(requested: str = "") -> str:
    """The device a job trains on: the one asked for, else ComfyUI's own."""
    requested = (requested or "").strip()
    if requested:
        if not DEVICE.match(requested):
            raise InputRefused(f"device {requested!r}: use cpu, cuda or cuda:N, or leave it empty for ComfyUI's device")
        return "cuda:0" if requested == "cuda" else requested
    import comfy.model_management as mm

    device = mm.get_torch_device()
    return f"{device.type}:{device.index or 0}" if getattr(device, "type", "") == "cuda" else str(device)


def free_device_memory(device: str) -> None:
    """Before a GPU job: ComfyUI's models out of the device memory the trainer needs."""
    if device != "cpu":
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()


def destination(folder: str, name: str) -> tuple[str, Path]:
    """(the name ComfyUI lists, the file) of a trained file in a models folder kind ("loras",
    "controlnet"): ``<first folder of that kind>/fairhuman/<name>.safetensors``."""
    import folder_paths

    listed = os.path.join(OUTPUT_SUBFOLDER, f"{name}.safetensors")
    return listed, Path(folder_paths.get_folder_paths(folder)[0]) / listed


def image_tensor(path: str | None, note: str):
    """A PNG as ComfyUI's IMAGE (1, H, W, 3 float), or a small gray card when there is none yet."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    if path and os.path.isfile(path):
        image = Image.open(path).convert("RGB")
    else:
        image = Image.new("RGB", (512, 128), (48, 48, 48))
        ImageDraw.Draw(image).text((12, 54), note, fill=(230, 230, 230))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def status_text(summary: dict) -> str:
    """A job's state in a line, for the node's progress text."""
    if summary.get("state") == "queued":
        behind, position = summary.get("queued_behind"), summary.get("queue_position")
        where = f" (position {position})" if position else ""
        return f"queued behind job {behind}{where}" if behind else f"queued{where}"
    stage, step, total = summary.get("stage") or "starting", summary.get("step") or 0, summary.get("total")
    eta = summary.get("eta_s")
    return f"{stage}: step {step}/{total}" + (f", about {eta:.0f} s left" if eta else "") if total else stage


class _TrainNode:
    """What every Train node does: check, submit, wait. A subclass declares its inputs (INPUTS, in
    ``train_inputs``), its outputs (OUTPUTS: name, type, tooltip), what it trains (METHOD), where
    the file goes (FOLDER), the data of its job (``job_data``) and its last output
    (``trained_output``). ``say``: where the node's progress text goes (a line at a time)."""

    INPUTS: dict = {}
    OUTPUTS: tuple = ()
    METHOD = ""
    LABEL = ""
    CATEGORY = "FairHuman"
    DESCRIPTION = ""
    FOLDER = "loras"  # the ComfyUI models folder kind the trained file is copied into
    WHAT = "LoRA"

    def __init__(self, say=None):
        self.say = say or (lambda text: None)

    def train(self, **values):
        import folder_paths

        values = with_defaults(self.INPUTS, values)
        data, source, files = self.job_data(values, folder_paths.get_input_directory())
        return self.launch(values, data=data, source=source, files=files)

    def method(self, values: dict) -> str:
        return self.METHOD

    def job_data(self, values: dict, input_dir: str) -> tuple[dict, dict, dict | None]:
        """(the JobSpec fields of the data to train on, the same as settings of the run, the files
        of a dataset from the graph, written only once the job may start)."""
        graph = graph_dataset(values.get("images"), values.get("captions"), values.get("face_masks"),
                              values.get("hand_masks"))
        if graph is not None:
            files = dataset_files(*graph)
            return {}, {"dataset": "<graph>", "graph_data": digest(files)}, files
        folder = str(resolve_dataset(values["dataset"], input_dir))
        return {"dataset": folder}, {"dataset": folder}, None

    def launch(self, values: dict, *, data: dict, source: dict, files: dict | None = None):
        """Check, then submit the job; in wait mode wait for it. Returns the node's outputs, the
        fourth ``trained_output(path, values)`` (wait mode) or ``untrained_output(values)``."""
        method, mode, overwrite = self.method(values), values["mode"], bool(values["overwrite"])
        name = sanitize_output_name(values["output_name"])
        if mode not in MODES:
            raise InputRefused(f"mode {mode!r}: expected one of {MODES}")
        listed, dest = destination(self.FOLDER, name)
        if dest.exists() and not overwrite:
            raise InputRefused(f"a {self.WHAT} named {listed!r} already exists ({dest}): choose another output_name "
                               f"or set overwrite to true to replace it")
        device = training_device(values["device"])
        train = trainer_options(self.INPUTS, values, device)
        if train.get("mixed_precision") == "fp16" and device == "cpu":
            raise InputRefused("mixed_precision fp16 needs a GPU and ComfyUI runs on the CPU: set mixed_precision "
                               "to auto or no, or bf16 (less memory, slower)")
        base, base_settings = base_files(values)
        manager = comfy_manager()
        settings = {"method": method, **base_settings, **source, **train}
        manager.check(name=name, device=device, settings=settings, overwrite=overwrite)
        if files is not None:  # the graph's data, once nothing refuses the job
            folder = Path(manager.runs_root) / GRAPH_DATA_FOLDER / name
            write_dataset(folder, files)
            data = {**data, "dataset": str(folder)}
        free_device_memory(device)
        devices = (values.get("devices") or "").strip()
        spec = JobSpec(method=method, **base, output_file=f"{name}.safetensors",
                       output_listed=listed, output_dest=str(dest), train=train, tokenizer=comfy_tokenizer(),
                       overwrite=overwrite, **data, **({"devices": devices} if devices else {}))
        job = manager.submit(spec, name=name, device=device, settings=settings, overwrite=overwrite)
        log.info("%s: job %s for %r started (%s mode), folder %s", self.LABEL, job.id, name, mode, job.dir)
        if mode == "background":
            note = f"training in the background: job {job.id} (jobs panel)"
            return self.outputs(listed, image_tensor(None, note), str(job.dir), self.untrained_output(values), None)
        self.wait(manager, job, name)
        return self.outputs(listed, image_tensor(job.record.get("plot"), "no loss plot"), str(job.dir),
                            self.trained_output(job.record["lora_path"], values), job.record.get("best_lora_name"))

    def outputs(self, listed: str, plot, run_dir: str, last, best: str | None) -> tuple:
        return listed, plot, run_dir, last

    def trained_output(self, path: str, values: dict):
        raise NotImplementedError

    def untrained_output(self, values: dict):
        return None

    def wait(self, manager, job, name: str) -> None:
        import comfy.model_management as mm
        import comfy.utils

        bar, shown, said = comfy.utils.ProgressBar(1), None, None
        try:
            while not job.finished.wait(WAIT_POLL_S):
                if mm.processing_interrupted():
                    raise mm.InterruptProcessingException()
                text = status_text(job.summary())
                if text != said:
                    self.say(text)
                    said = text
                now = (job.step or 0, job.total or 0)
                if now[1] and now != shown:
                    bar.update_absolute(now[0], now[1])  # also where ComfyUI delivers an interrupt
                    shown = now
        except (mm.InterruptProcessingException, KeyboardInterrupt):
            manager.cancel(job.id)
            raise RuntimeError(
                f"{self.LABEL} {name!r}: cancelled at step {job.step}/{job.total or '?'} ({job.stage or 'start'}); "
                f"resumable — queue it again with the same output_name and settings to continue from the "
                f"checkpoint") from None
        if job.state == "cancelled":
            raise RuntimeError(f"{self.LABEL} {name!r}: {job.record.get('error') or 'cancelled'}; resumable — "
                               f"queue it again with the same output_name and settings to continue")
        if job.state != "done":
            raise RuntimeError(f"{self.LABEL} {name!r} failed: {job.record.get('error')} (log: {job.dir / 'job.log'})")
        self.say(f"done: {job.record.get('lora_name') or name}")
        if job.total:
            bar.update_absolute(job.total, job.total)


class _TrainLoRANode(_TrainNode):
    # released outputs first, in order (saved links name their slots); new ones are appended
    OUTPUTS = (("lora_name", "STRING", "The LoRA's name in the loras list (LoraLoader, the pack's loaders)."),
               ("loss_plot", "IMAGE", "Each objective's loss over the steps (and the MPD weight shares / DPO margins)."),
               ("run_dir", "STRING", "The job's folder: events.jsonl, job.log, train/ (checkpoints, config)."),
               ("model", "MODEL", "The input model with the new LoRA (wait mode, when a model is linked)."),
               ("best_lora_name", "STRING", "With validate_every: the best-scoring LoRA (<name>_best.safetensors) in "
                                            "the loras list; else the same as lora_name."))

    def outputs(self, listed: str, plot, run_dir: str, last, best: str | None) -> tuple:
        return listed, plot, run_dir, last, best or listed

    def trained_output(self, path: str, values: dict):
        if values["model"] is None:
            return None
        from .loaders import apply_lora

        out_model, _, info = apply_lora(values["model"], None, path, values["strength"], 0.0, self.method(values))
        log.info("%s", info)
        return out_model

    def untrained_output(self, values: dict):
        return values["model"]  # background: the model as it came


class FairHumanTrainLoRA(_TrainLoRANode):
    INPUTS = FAIRHUMAN_LORA
    METHOD = "fairhuman"
    LABEL = "Train FairHuman LoRA"
    CATEGORY = "FairHuman"
    DESCRIPTION = ("Trains a FairHuman LoRA on a folder of photos (annotated first when it has no metadata.jsonl), "
                   "or on images from the graph with their captions and masks: "
                   "global, face and hand losses with MPD-fair weighting. The LoRA lands in "
                   f"models/loras/{OUTPUT_SUBFOLDER}/ and is listed at once.")


class FairHumanTrainControlNet(_TrainNode):
    INPUTS = FAIRHUMAN_CONTROLNET
    METHOD = "fairhuman-controlnet"
    LABEL = "Train FairHuman ControlNet"
    CATEGORY = "FairHuman"
    FOLDER = "controlnet"
    WHAT = "ControlNet"
    OUTPUTS = (("control_net_name", "STRING",
                "The ControlNet's name in the controlnet list (Load ControlNet, Load FairHuman ControlNet)."),
               ("loss_plot", "IMAGE", "Each objective's loss over the steps (and the MPD weight shares)."),
               ("run_dir", "STRING", "The job's folder: events.jsonl, job.log, dataset/ (poses), train/ (checkpoints, "
                                     "config)."),
               ("control_net", "CONTROL_NET", "The trained ControlNet, loaded (wait mode): link it to Apply ControlNet."))
    DESCRIPTION = ("Trains a FairHuman pose ControlNet on a folder of photos: each photo's whole-body pose is "
                   "rendered OpenPose-style (or your own masks/<stem>_condition.png is used), then the ControlNet, "
                   "initialized from the checkpoint's UNet, learns the global, face and hand losses with MPD-fair "
                   f"weighting. It lands in models/controlnet/{OUTPUT_SUBFOLDER}/ and is listed at once.")

    def untrained_output(self, values: dict):
        # a None CONTROL_NET would crash Apply ControlNet with a message about None: block the
        # nodes that use it, with this error, instead (ComfyUI's ExecutionBlocker)
        from comfy_execution.graph_utils import ExecutionBlocker

        return ExecutionBlocker(
            f"{self.LABEL}: in background mode the ControlNet does not exist yet when the node returns; use "
            f"mode wait to sample with it in the same graph, or load it with Load FairHuman ControlNet once the "
            f"job is done (jobs panel)")

    def trained_output(self, path: str, values: dict):
        from .loaders import load_controlnet

        control, info = load_controlnet(path)
        log.info("%s: %s", self.LABEL, info)
        return control


class HGDPOTrainLoRA(_TrainLoRANode):
    INPUTS = HGDPO_LORA
    METHOD = "hg-dpo"
    LABEL = "Train HG-DPO LoRA"
    CATEGORY = "HG-DPO"
    DESCRIPTION = ("Trains an HG-DPO LoRA: N images per prompt from the checkpoint, scored (AI feedback), best vs. "
                   "worst as preference pairs, then Diffusion-DPO + statistic matching. Resumable at every stage.")

    def method(self, values: dict) -> str:
        if values["method"] not in DPO_METHODS:
            raise InputRefused(f"method {values['method']!r}: expected one of {DPO_METHODS}")
        return values["method"]

    def job_data(self, values: dict, input_dir: str) -> tuple[dict, dict, None]:
        """A pairs folder, or the prompts and how to build pairs from them."""
        self.method(values)  # refused before any folder is looked at
        if (values["pairs"] or "").strip():
            folder = resolve_folder(values["pairs"], input_dir, "pairs")
            if not (folder / "pairs.jsonl").is_file():
                raise InputRefused(f"pairs folder {folder} has no pairs.jsonl: make it with 'python -m trainers "
                                   f"build-pairs', or leave pairs empty to build pairs from the prompts")
            return {"pairs": str(folder)}, {"pairs": str(folder)}, None
        lines = [p.strip() for p in (values["prompts"] or "").splitlines() if p.strip()]
        if not lines:
            raise InputRefused("prompts is empty: write one prompt a line (or name a pairs folder)")
        scorer, models = values["scorer"], {}
        if scorer != "anatomy":
            import folder_paths

            folder = Path(folder_paths.models_dir) / "scorers" / scorer
            if not folder.is_dir():
                raise InputRefused(f"scorer {scorer} needs its local weights in {folder} (layouts: "
                                   f"docs/scorers.md); the anatomy scorer needs none")
            models[scorer] = str(folder)
        # build-pairs options by their flags' names (trainers/build_pairs.py)
        build_pairs = {"n": values["images_per_prompt"], "scorer": scorer, "size": values["resolution"],
                       "steps": values["sampling_steps"], "seed": values["seed"]}
        source = {"prompts": lines, "images_per_prompt": values["images_per_prompt"], "scorer": scorer,
                  "sampling_steps": values["sampling_steps"]}
        return {"prompts": lines, "build_pairs": build_pairs, "scorer_models": models}, source, None


# The Train nodes' job logic by node id (the nodes themselves: nodes/train_nodes.py)
NODE_CLASS_MAPPINGS = {"FairHumanTrainLoRA": FairHumanTrainLoRA, "FairHumanTrainControlNet": FairHumanTrainControlNet,
                       "HGDPOTrainLoRA": HGDPOTrainLoRA}
