"""Train FairHuman LoRA / Train FairHuman ControlNet / Train HG-DPO LoRA: the bundled trainers
as jobs, from a graph.

The node checks every input before anything is written (dataset inside the allowed folders,
a plain output name, no file of that name unless ``overwrite``, the same settings when a run of
that name exists, a free device), then hands a spec to the job manager, which runs
``python -m trainers job`` in its own process. ``wait`` blocks the queue, drives the progress
bar and turns a UI interrupt into SIGTERM (the trainer checkpoints: resumable); ``background``
returns at once and the job goes on while the queue runs other prompts.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..core.scorers import NAMES as SCORERS
from ..core.weighting import WEIGHTINGS
from .job_manager import comfy_manager
from .job_paths import LORA_SUBFOLDER, InputRefused, resolve_dataset, resolve_folder, sanitize_output_name

log = logging.getLogger("fairhuman-hgdpo")

MODES = ["wait", "background"]
PRECISIONS = ["no", "fp16", "bf16"]
DPO_METHODS = ["hg-dpo", "fair-dpo"]
WAIT_POLL_S = 0.2


# ---- ComfyUI facts ----------------------------------------------------------------------------
def _checkpoints():
    import folder_paths

    return folder_paths.get_filename_list("checkpoints")


def checkpoint_path(name: str) -> str:
    from .loaders import resolve

    return resolve("checkpoints", name)


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

    listed = os.path.join(LORA_SUBFOLDER, f"{name}.safetensors")
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


# ---- shared by the nodes ----------------------------------------------------------------------
def _optional_training() -> dict:
    return {
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per micro-batch (paper: 1)."}),
        "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 256,
                                          "tooltip": "Micro-batches per optimizer step."}),
        "mixed_precision": (PRECISIONS, {"default": "fp16", "tooltip": (
            "UNet forward in fp16/bf16 (trained weights stay fp32; paper: fp16). fp16 needs a GPU; bf16 also runs "
            "on a CPU (slowly, in less memory than no).")}),
        "gradient_checkpointing": ("BOOLEAN", {"default": False,
                                               "tooltip": "Less activation memory for more compute."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False,
                         "tooltip": ("Seed of data order, noise and timesteps. On one CPU thread a resumed run is bit "
                                     "for bit the same as an uninterrupted one; more threads sum in varying order.")}),
        "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 100000, "tooltip": (
            "Save a resumable checkpoint every N steps (0: only when cancelled). An interrupt always saves one.")}),
        "device": ("STRING", {"default": "", "tooltip": (
            "Where the job trains: empty for ComfyUI's device, or cpu, cuda, cuda:N. One job runs per device.")}),
        "overwrite": ("BOOLEAN", {"default": False, "tooltip": (
            "Replace an existing file of this name and start its run over. Off: an existing file is refused, "
            "and a cancelled run of this name is resumed.")}),
    }


def _optional_lora_output(strength: float) -> dict:
    return {
        "model": ("MODEL", {"tooltip": "Optional: outputs this model with the new LoRA applied (wait mode), "
                                       "so one graph trains and samples."}),
        "strength": ("FLOAT", {"default": strength, "min": -4.0, "max": 4.0, "step": 0.01,
                               "tooltip": "Strength of the LoRA on the model output."}),
    }


def _common_required(steps: int, default_name: str, where: str) -> dict:
    return {
        "output_name": ("STRING", {"default": default_name, "tooltip": (
            f"Name of the file: {where}/{LORA_SUBFOLDER}/<name>.safetensors, and of its run. Queueing the "
            f"same name with the same settings resumes a cancelled run.")}),
        "steps": ("INT", {"default": steps, "min": 1, "max": 1000000, "tooltip": "Optimizer steps."}),
    }


def _photos_inputs() -> dict:
    """The base and the photo folder of the FairHuman nodes (LoRA and ControlNet)."""
    return {
        "ckpt_name": (_checkpoints(), {"tooltip": "The base checkpoint to train on (SD1.5 or SDXL)."}),
        "dataset": ("STRING", {"default": "fairhuman_photos", "tooltip": (
            "A folder of photos inside ComfyUI's input directory (or an absolute path under a folder "
            "listed in FAIRHUMAN_ALLOWED_ROOTS). Without metadata.jsonl it is annotated first.")}),
    }


RESOLUTION = ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 64, "tooltip": (
    "Training side in pixels (aspect buckets keep about resolution² pixels). Paper (SDXL): 1024.")})
LEARNING_RATE = ("FLOAT", {"default": 1e-5, "min": 1e-8, "max": 1e-1, "step": 1e-6, "round": False,
                           "tooltip": "Learning rate. Paper: 1e-5."})
WEIGHTING = (list(WEIGHTINGS), {"default": "mpd", "tooltip": (
    "How the global, face and hand gradients are combined: mpd (the paper's fair weighting) or "
    "a baseline (ls, dwa, uw, rlw, si, nash-mtl, mpd-closed-form).")})
NORMALIZATION = (["reference", "area"], {"default": "reference", "tooltip": (
    "Masked-loss normalization: reference (the FairHuman code's) or area (mean over the region).")})
FAIR_EVERY = ("INT", {"default": 1, "min": 1, "max": 1000, "tooltip": (
    "Solve the fair weights every N steps; in between, one backward with the last weights "
    "(a plain step's cost). 1: every step, as in the paper.")})


def _mode_input() -> tuple:
    return (MODES, {"default": "wait", "tooltip": (
        "wait: the node blocks the queue with a progress bar until the file is ready (Cancel stops it, "
        "resumably). background: returns at once; follow the job in the jobs panel or GET /fairhuman/jobs.")})


class _TrainNode:
    """What every Train node does: check, submit, wait; a subclass says what it trains (METHOD),
    where the file goes (FOLDER) and what its last output is (``trained_output``)."""

    FUNCTION = "train"
    OUTPUT_NODE = True  # it writes a file: runs even when nothing consumes its outputs
    METHOD = ""
    LABEL = ""
    FOLDER = "loras"  # the ComfyUI models folder kind the trained file is copied into
    WHAT = "LoRA"

    def launch(self, *, ckpt_name: str, output_name: str, mode: str, overwrite: bool, spec: dict, settings: dict,
               device: str = "", method: str = "", output=None):
        """Submit the job; in wait mode wait for it. Returns the node's four outputs, the last one
        ``trained_output(path, output)`` (wait mode) or ``untrained_output(output)`` (background)."""
        method = method or self.METHOD
        name = sanitize_output_name(output_name)
        if mode not in MODES:
            raise InputRefused(f"mode {mode!r}: expected one of {MODES}")
        listed, dest = destination(self.FOLDER, name)
        if dest.exists() and not overwrite:
            raise InputRefused(f"a {self.WHAT} named {listed!r} already exists ({dest}): choose another output_name "
                               f"or set overwrite to true to replace it")
        device = training_device(device)
        if settings.get("mixed_precision") == "fp16" and device == "cpu":
            raise InputRefused("mixed_precision fp16 needs a GPU and ComfyUI runs on the CPU: set mixed_precision "
                               "to no, or bf16 (less memory, slower)")
        manager = comfy_manager()
        settings = {"method": method, "ckpt_name": ckpt_name, **settings}
        spec["train"] = {**spec["train"], "device": device}
        manager.check(name=name, device=device, settings=settings, overwrite=overwrite)
        free_device_memory(device)
        spec = {"version": 1, "method": method, "base": checkpoint_path(ckpt_name),
                "tokenizer": comfy_tokenizer(), "lora_file": f"{name}.safetensors", "lora_name": listed,
                "lora_dest": str(dest), "overwrite": bool(overwrite), **spec}
        job = manager.submit(spec, name=name, method=method, device=device, settings=settings,
                             lora_name=listed, overwrite=overwrite)
        log.info("%s: job %s for %r started (%s mode), folder %s", self.LABEL, job.id, name, mode, job.dir)
        if mode == "background":
            note = f"training in the background: job {job.id} (jobs panel)"
            return listed, image_tensor(None, note), str(job.dir), self.untrained_output(output)
        self.wait(manager, job, name)
        return (listed, image_tensor(job.record.get("plot"), "no loss plot"), str(job.dir),
                self.trained_output(job.record["lora_path"], output))

    def trained_output(self, path: str, output):
        raise NotImplementedError

    def untrained_output(self, output):
        return None

    def wait(self, manager, job, name: str) -> None:
        import comfy.model_management as mm
        import comfy.utils

        bar, shown = comfy.utils.ProgressBar(1), None
        try:
            while not job.finished.wait(WAIT_POLL_S):
                if mm.processing_interrupted():
                    raise mm.InterruptProcessingException()
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
        if job.total:
            bar.update_absolute(job.total, job.total)


class _TrainLoRANode(_TrainNode):
    RETURN_TYPES = ("STRING", "IMAGE", "STRING", "MODEL")
    RETURN_NAMES = ("lora_name", "loss_plot", "run_dir", "model")
    OUTPUT_TOOLTIPS = ("The LoRA's name in the loras list (LoraLoader, the pack's loaders).",
                       "Each objective's loss over the steps (and the MPD weight shares / DPO margins).",
                       "The job's folder: events.jsonl, job.log, train/ (checkpoints, config).",
                       "The input model with the new LoRA (wait mode, when a model is linked).")

    def trained_output(self, path: str, output):
        model, strength, method = output
        if model is None:
            return None
        from .loaders import apply_lora

        out_model, _, info = apply_lora(model, None, path, strength, 0.0, method)
        log.info("%s", info)
        return out_model

    def untrained_output(self, output):
        return output[0]  # background: the model as it came

    def launch_lora(self, *, model, strength: float, method: str = "", **launch):
        return self.launch(method=method, output=(model, strength, method or self.METHOD), **launch)


def _fairhuman_settings(steps, resolution, learning_rate, weighting, normalization, fair_every, batch_size,
                        gradient_accumulation, mixed_precision, gradient_checkpointing, seed, checkpoint_every) -> dict:
    """The trainer options of the FairHuman nodes (LoRA and ControlNet), by the trainer's names."""
    return {"steps": steps, "resolution": resolution, "lr": learning_rate, "weighting": weighting,
            "normalization": normalization, "fair_every": fair_every, "batch_size": batch_size,
            "grad_accum": gradient_accumulation, "mixed_precision": mixed_precision,
            "gradient_checkpointing": gradient_checkpointing, "seed": seed, "checkpoint_every": checkpoint_every}


class FairHumanTrainLoRA(_TrainLoRANode):
    METHOD = "fairhuman"
    LABEL = "Train FairHuman LoRA"
    CATEGORY = "FairHuman"
    DESCRIPTION = ("Trains a FairHuman LoRA on a folder of photos (annotated first when it has no metadata.jsonl): "
                   "global, face and hand losses with MPD-fair weighting. The LoRA lands in "
                   f"models/loras/{LORA_SUBFOLDER}/ and is listed at once.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_photos_inputs(),
                **_common_required(1000, "my_fairhuman_lora", "models/loras"),
                "resolution": RESOLUTION,
                "rank": ("INT", {"default": 256, "min": 1, "max": 1024, "tooltip": "LoRA rank. Paper: 256."}),
                "learning_rate": LEARNING_RATE,
                "weighting": WEIGHTING,
                "mode": _mode_input(),
            },
            "optional": {
                "normalization": NORMALIZATION,
                **_optional_training(),
                **_optional_lora_output(0.4),
                "fair_every": FAIR_EVERY,
            },
        }

    def train(self, ckpt_name, dataset, output_name, steps, resolution, rank, learning_rate, weighting, mode,
              normalization="reference", batch_size=1, gradient_accumulation=1, mixed_precision="fp16",
              gradient_checkpointing=False, seed=0, checkpoint_every=100, device="", overwrite=False, model=None,
              strength=0.4, fair_every=1):
        import folder_paths

        folder = resolve_dataset(dataset, folder_paths.get_input_directory())
        train = {"rank": rank, **_fairhuman_settings(
            steps, resolution, learning_rate, weighting, normalization, fair_every, batch_size,
            gradient_accumulation, mixed_precision, gradient_checkpointing, seed, checkpoint_every)}
        return self.launch_lora(ckpt_name=ckpt_name, output_name=output_name, mode=mode, overwrite=overwrite,
                                model=model, strength=strength, spec={"dataset": str(folder), "train": train},
                                settings={"dataset": str(folder), **train}, device=device)


class FairHumanTrainControlNet(_TrainNode):
    METHOD = "fairhuman-controlnet"
    LABEL = "Train FairHuman ControlNet"
    CATEGORY = "FairHuman"
    FOLDER = "controlnet"
    WHAT = "ControlNet"
    RETURN_TYPES = ("STRING", "IMAGE", "STRING", "CONTROL_NET")
    RETURN_NAMES = ("control_net_name", "loss_plot", "run_dir", "control_net")
    OUTPUT_TOOLTIPS = ("The ControlNet's name in the controlnet list (Load ControlNet, Load FairHuman ControlNet).",
                       "Each objective's loss over the steps (and the MPD weight shares).",
                       "The job's folder: events.jsonl, job.log, dataset/ (poses), train/ (checkpoints, config).",
                       "The trained ControlNet, loaded (wait mode): link it to Apply ControlNet.")
    DESCRIPTION = ("Trains a FairHuman pose ControlNet on a folder of photos: each photo's whole-body pose is "
                   "rendered OpenPose-style (or your own masks/<stem>_condition.png is used), then the ControlNet, "
                   "initialized from the checkpoint's UNet, learns the global, face and hand losses with MPD-fair "
                   f"weighting. It lands in models/controlnet/{LORA_SUBFOLDER}/ and is listed at once.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_photos_inputs(),
                **_common_required(1000, "my_fairhuman_controlnet", "models/controlnet"),
                "resolution": RESOLUTION,
                "learning_rate": LEARNING_RATE,
                "weighting": WEIGHTING,
                "mode": _mode_input(),
            },
            "optional": {
                "condition_dropout": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                    "Probability that a photo's pose is hidden (black) in a step, so the ControlNet also learns "
                    "without it. Paper: 0.3.")}),
                "normalization": NORMALIZATION,
                **_optional_training(),
                "fair_every": FAIR_EVERY,
            },
        }

    def train(self, ckpt_name, dataset, output_name, steps, resolution, learning_rate, weighting, mode,
              condition_dropout=0.3, normalization="reference", batch_size=1, gradient_accumulation=1,
              mixed_precision="fp16", gradient_checkpointing=False, seed=0, checkpoint_every=100, device="",
              overwrite=False, fair_every=1):
        import folder_paths

        folder = resolve_dataset(dataset, folder_paths.get_input_directory())
        train = {"condition_dropout": condition_dropout, **_fairhuman_settings(
            steps, resolution, learning_rate, weighting, normalization, fair_every, batch_size,
            gradient_accumulation, mixed_precision, gradient_checkpointing, seed, checkpoint_every)}
        return self.launch(ckpt_name=ckpt_name, output_name=output_name, mode=mode, overwrite=overwrite,
                           spec={"dataset": str(folder), "train": train}, settings={"dataset": str(folder), **train},
                           device=device)

    def untrained_output(self, output):
        # a None CONTROL_NET would crash Apply ControlNet with a message about None: block the
        # nodes that use it, with this error, instead (ComfyUI's ExecutionBlocker)
        from comfy_execution.graph_utils import ExecutionBlocker

        return ExecutionBlocker(
            f"{self.LABEL}: in background mode the ControlNet does not exist yet when the node returns; use "
            f"mode wait to sample with it in the same graph, or load it with Load FairHuman ControlNet once the "
            f"job is done (jobs panel)")

    def trained_output(self, path: str, output):
        from .loaders import load_controlnet

        control, info = load_controlnet(path)
        log.info("%s: %s", self.LABEL, info)
        return control


class HGDPOTrainLoRA(_TrainLoRANode):
    METHOD = "hg-dpo"
    LABEL = "Train HG-DPO LoRA"
    CATEGORY = "HG-DPO"
    DESCRIPTION = ("Trains an HG-DPO LoRA: N images per prompt from the checkpoint, scored (AI feedback), best vs. "
                   "worst as preference pairs, then Diffusion-DPO + statistic matching. Resumable at every stage.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (_checkpoints(), {"tooltip": "The model to improve (paper: SD1.5); also makes the pairs."}),
                "prompts": ("STRING", {"multiline": True, "default": "a photo of a person waving\n", "tooltip": (
                    "One prompt a line; each gives one preference pair. Ignored when 'pairs' names a folder.")}),
                "images_per_prompt": ("INT", {"default": 20, "min": 2, "max": 256, "tooltip": (
                    "Images generated and scored per prompt; the best and the worst make the pair. Paper: 20.")}),
                "scorer": (list(SCORERS), {"default": "anatomy", "tooltip": (
                    "anatomy (built in, offline). pickscore / hps / imagereward need their weights in "
                    "models/scorers/<name> (docs/scorers.md).")}),
                **_common_required(1000, "my_hgdpo_lora", "models/loras"),
                "mode": _mode_input(),
            },
            "optional": {
                "pairs": ("STRING", {"default": "", "tooltip": (
                    "A pairs folder made by 'python -m trainers build-pairs', inside the input directory: trains "
                    "on it instead of building pairs from the prompts.")}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                                       "tooltip": "Side of the generated images and of training. SD1.5: 512."}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 1024, "tooltip": "LoRA rank. Paper: 8."}),
                "learning_rate": LEARNING_RATE,
                "sampling_steps": ("INT", {"default": 30, "min": 1, "max": 200,
                                           "tooltip": "Sampler steps of each generated image."}),
                **_optional_training(),
                **_optional_lora_output(0.5),
                "method": (DPO_METHODS, {"default": "hg-dpo", "tooltip": (
                    "hg-dpo: the paper's whole-image preference. fair-dpo: the preference split into global, face "
                    "and hand terms (each image's own masks) combined by MPD, so hands and faces get their say.")}),
            },
        }

    def train(self, ckpt_name, prompts, images_per_prompt, scorer, output_name, steps, mode, pairs="",
              resolution=512, rank=8, learning_rate=1e-5, sampling_steps=30, batch_size=1,
              gradient_accumulation=1, mixed_precision="fp16", gradient_checkpointing=False, seed=0,
              checkpoint_every=100, device="", overwrite=False, model=None, strength=0.5, method="hg-dpo"):
        import folder_paths

        if method not in DPO_METHODS:
            raise InputRefused(f"method {method!r}: expected one of {DPO_METHODS}")
        train = {"steps": steps, "resolution": resolution, "rank": rank, "lr": learning_rate,
                 "batch_size": batch_size, "grad_accum": gradient_accumulation, "mixed_precision": mixed_precision,
                 "gradient_checkpointing": gradient_checkpointing, "seed": seed, "checkpoint_every": checkpoint_every}
        spec: dict = {"train": train}
        if (pairs or "").strip():
            folder = resolve_folder(pairs, folder_paths.get_input_directory(), "pairs")
            if not (folder / "pairs.jsonl").is_file():
                raise InputRefused(f"pairs folder {folder} has no pairs.jsonl: make it with 'python -m trainers "
                                   f"build-pairs', or leave pairs empty to build pairs from the prompts")
            spec["pairs"] = str(folder)
            source = {"pairs": str(folder)}
        else:
            lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
            if not lines:
                raise InputRefused("prompts is empty: write one prompt a line (or name a pairs folder)")
            models = {}
            if scorer != "anatomy":
                folder = Path(folder_paths.models_dir) / "scorers" / scorer
                if not folder.is_dir():
                    raise InputRefused(f"scorer {scorer} needs its local weights in {folder} (layouts: "
                                       f"docs/scorers.md); the anatomy scorer needs none")
                models[scorer] = str(folder)
            spec.update(prompts=lines, build_pairs={"n": images_per_prompt, "scorer": scorer, "size": resolution,
                                                    "steps": sampling_steps, "seed": seed, "scorer_models": models})
            source = {"prompts": lines, "images_per_prompt": images_per_prompt, "scorer": scorer,
                      "sampling_steps": sampling_steps}
        return self.launch_lora(ckpt_name=ckpt_name, output_name=output_name, mode=mode, overwrite=overwrite,
                                model=model, strength=strength, spec=spec, settings={**source, **train},
                                device=device, method=method)


NODE_CLASS_MAPPINGS = {"FairHumanTrainLoRA": FairHumanTrainLoRA, "FairHumanTrainControlNet": FairHumanTrainControlNet,
                       "HGDPOTrainLoRA": HGDPOTrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"FairHumanTrainLoRA": "Train FairHuman LoRA",
                              "FairHumanTrainControlNet": "Train FairHuman ControlNet",
                              "HGDPOTrainLoRA": "Train HG-DPO LoRA"}
