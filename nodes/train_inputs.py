"""The Train nodes' inputs as data: name, type, default, tooltip, and the trainer option each one
sets. Nothing here imports ComfyUI, so tests check saved workflows and the node -> spec -> trainer
round trip against exactly what the nodes declare (``nodes/train_lora.py`` turns these into
``INPUT_TYPES``).

Frozen once released: saved workflows name the inputs and store the widget values by position,
so no input is renamed, removed or moved; a new one goes at the end of ``optional``. The node's
names may differ from the trainer's (``learning_rate`` sets ``lr``): ``Input.field`` is the one
place that maps them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..core.scorers import NAMES as SCORERS
from ..core.weighting import WEIGHTINGS
from .job_paths import OUTPUT_SUBFOLDER

NONE = "none"  # the choice of a model-file input that names no file


@dataclass(frozen=True)
class ModelFiles:
    """The kind of an input choosing a file of a ComfyUI models folder: the node lists the folder's
    files there, with ``none`` first where the input may name no file (``none="first"``), or last
    where the input is required but another input can stand in for it (``none="last"``)."""

    folder: str  # a folder_paths kind: checkpoints, diffusion_models, text_encoders, vae
    none: str = ""  # "", "first" or "last"

    def choices(self, files: list) -> list:
        return {"first": [NONE, *files], "last": [*files, NONE]}.get(self.none, list(files))


CHECKPOINTS = ModelFiles("checkpoints", none="last")  # none: a DiT base from diffusion_model instead
MODES = ["wait", "background"]
PRECISIONS = ["auto", "no", "fp16", "bf16"]
DPO_METHODS = ["hg-dpo", "fair-dpo"]
NORMALIZATIONS = ["reference", "area"]


@dataclass(frozen=True)
class Input:
    kind: object  # INT, FLOAT, STRING, BOOLEAN, MODEL, IMAGE, MASK, a list of choices, or ModelFiles
    options: dict = field(default_factory=dict)  # ComfyUI's: default, min, max, tooltip, ...
    field: str = ""  # the TrainConfig field its value goes to ("": the node itself uses it)

    def choices(self, model_files) -> list | None:
        """The choices of a combo input (``model_files(folder)``: a models folder's file names);
        None for any other input."""
        if isinstance(self.kind, ModelFiles):
            return self.kind.choices(model_files(self.kind.folder))
        return list(self.kind) if isinstance(self.kind, list) else None

    def declaration(self, model_files) -> tuple:
        """The ``(type, options)`` tuple ComfyUI reads."""
        choices = self.choices(model_files)
        return (self.kind if choices is None else choices, dict(self.options))


def _tip(text: str, **options) -> dict:
    return {**options, "tooltip": text}


# ---- inputs shared by the nodes -------------------------------------------------------------------
def _name_and_steps(default_name: str, where: str, steps: int = 1000) -> dict:
    return {
        "output_name": Input("STRING", _tip(
            f"Name of the file: {where}/{OUTPUT_SUBFOLDER}/<name>.safetensors, and of its run. Queueing the same "
            f"name with the same settings resumes a cancelled run.", default=default_name)),
        "steps": Input("INT", _tip("Optimizer steps.", default=steps, min=1, max=1000000), "steps"),
    }


PHOTOS = {
    "ckpt_name": Input(CHECKPOINTS, _tip(
        "The base checkpoint to train on (SD1.5, SDXL, or SD3.5 with its text encoders). Ignored when "
        "diffusion_model names a file.")),
    "dataset": Input("STRING", _tip(
        "A folder of photos inside ComfyUI's input directory (or an absolute path under a folder listed in "
        "FAIRHUMAN_ALLOWED_ROOTS). Without metadata.jsonl it is annotated first.", default="fairhuman_photos")),
}
RESOLUTION = Input("INT", _tip("Training side in pixels (aspect buckets keep about resolution² pixels). Paper "
                               "(SDXL): 1024.", default=1024, min=64, max=4096, step=64), "resolution")
LEARNING_RATE = Input("FLOAT", _tip("Learning rate. Paper: 1e-5.", default=1e-5, min=1e-8, max=1e-1, step=1e-6,
                                    round=False), "lr")
WEIGHTING = Input(list(WEIGHTINGS), _tip(
    "How the global, face and hand gradients are combined: mpd (the paper's fair weighting) or a baseline ("
    + ", ".join(w for w in WEIGHTINGS if w != "mpd") + ").", default="mpd"), "weighting")
MODE = Input(MODES, _tip(
    "wait: the node blocks the queue with a progress bar until the file is ready (Cancel stops it, resumably). "
    "background: returns at once; follow the job in the jobs panel or GET /fairhuman/jobs.", default="wait"))
NORMALIZATION = Input(NORMALIZATIONS, _tip(
    "Masked-loss normalization: reference (the FairHuman code's) or area (mean over the region).",
    default="reference"), "normalization")
FAIR_EVERY = Input("INT", _tip(
    "Solve the fair weights every N steps; in between, one backward with the last weights (a plain step's "
    "cost). 1: every step, as in the paper.", default=1, min=1, max=1000), "fair_every")

TRAINING = {
    "batch_size": Input("INT", _tip("Images per micro-batch (paper: 1).", default=1, min=1, max=64), "batch_size"),
    "gradient_accumulation": Input("INT", _tip("Micro-batches per optimizer step.", default=1, min=1, max=256),
                                   "grad_accum"),
    "mixed_precision": Input(PRECISIONS, _tip(
        "UNet forward in fp16/bf16 (trained weights stay fp32; paper: fp16). auto: bf16 on a GPU that has it, else "
        "fp16 on a GPU, no (fp32) on a CPU. fp16 needs a GPU; bf16 also runs on a CPU (slowly, in less memory than "
        "no).", default="auto"), "mixed_precision"),
    "gradient_checkpointing": Input("BOOLEAN", _tip("Less activation memory for more compute.", default=False),
                                    "gradient_checkpointing"),
    "seed": Input("INT", _tip(
        "Seed of data order, noise and timesteps. On one CPU thread a resumed run is bit for bit the same as an "
        "uninterrupted one; more threads sum in varying order.", default=0, min=0, max=2**31 - 1,
        control_after_generate=False), "seed"),
    "checkpoint_every": Input("INT", _tip(
        "Save a resumable checkpoint every N steps (0: only when cancelled). An interrupt always saves one.",
        default=100, min=0, max=100000), "checkpoint_every"),
    # the node resolves it (ComfyUI's device when empty) before it becomes the trainer's --device
    "device": Input("STRING", _tip(
        "Where the job trains: empty for ComfyUI's device, or cpu, cuda, cuda:N. One job runs per device.",
        default="")),
    "overwrite": Input("BOOLEAN", _tip(
        "Replace an existing file of this name and start its run over. Off: an existing file is refused, and a "
        "cancelled run of this name is resumed.", default=False)),
}


# Training data from the graph instead of the dataset folder (sockets only: no widget, so saved
# workflows' widget values keep their places). Lists: the Train nodes take every input as a list.
GRAPH_DATA = {
    "images": Input("IMAGE", _tip(
        "Optional: train on these images instead of the dataset folder: an IMAGE batch, or the image list of "
        "ComfyUI's dataset nodes (sizes may differ). The job writes them, with the captions and masks, into its "
        "own dataset folder, annotated as a folder is.")),
    "captions": Input("STRING", _tip(
        "Optional, with images: one caption per image (a STRING list), or one for all.", forceInput=True)),
    "face_masks": Input("MASK", _tip(
        "Optional, with images: a face mask per image, of the image's size (from any mask node: SAM, YOLO, a "
        "painted mask); replaces face detection.")),
    "hand_masks": Input("MASK", _tip(
        "Optional, with images: a hand mask per image, of the image's size; replaces hand detection.")),
}
VALIDATE_EVERY = Input("INT", _tip(
    "Every N steps and at the end, render the validation prompts with the current LoRA and score them (Face/Hand "
    "Confi.); the best is kept as <name>_best.safetensors (best_lora_name). Each validation costs a few sampled "
    "images (minutes on a CPU). 0: off.", default=0, min=0, max=100000), "validate_every")
DEVICES = Input("STRING", _tip(
    "Train on several GPUs: cuda:0,1 or all (one process per GPU, under accelerate). Empty: one process on "
    "'device'.", default=""))


# A diffusion transformer base (Flux.1, SD3.5, Z-Image) as ComfyUI's own loaders take it: the model from
# models/diffusion_models, its text encoders, its VAE. The text encoders and VAE also complete a
# checkpoint that lacks them (SD3.5's own files hold no T5).
TEXT_ENCODER_TIP = ("A text encoder of the base, from models/text_encoders (as DualCLIPLoader / TripleCLIPLoader "
                    "take them: Flux.1 clip_l and t5xxl; SD3.5 clip_l, clip_g and t5xxl; Z-Image qwen_3_4b). "
                    "Their order does not matter.")
DIT_BASE = {
    "diffusion_model": Input(ModelFiles("diffusion_models", none="first"), _tip(
        "Train on a diffusion transformer from models/diffusion_models (Flux.1 dev or schnell, SD3.5, Z-Image) "
        "instead of ckpt_name, with its text encoders and VAE below. none: the base is ckpt_name.")),
    "text_encoder_1": Input(ModelFiles("text_encoders", none="first"), _tip(TEXT_ENCODER_TIP)),
    "text_encoder_2": Input(ModelFiles("text_encoders", none="first"), _tip(TEXT_ENCODER_TIP)),
    "text_encoder_3": Input(ModelFiles("text_encoders", none="first"), _tip(TEXT_ENCODER_TIP)),
    "vae": Input(ModelFiles("vae", none="first"), _tip(
        "The base's VAE, from models/vae (Flux.1 and Z-Image: ae.safetensors). none: the one inside ckpt_name.")),
}
TEXT_ENCODERS = ("text_encoder_1", "text_encoder_2", "text_encoder_3")
# What fits a large base on one GPU (docs/memory.md; python -m trainers bench memory prints the budget).
FIT_GPU = {
    "base_weights": Input(["compute", "fp8"], _tip(
        "How the frozen base is stored: compute (in the mixed_precision dtype) or fp8 (about half of bf16; each "
        "layer upcast as it runs). fp8 needs gradient_checkpointing; Flux.1-dev needs it to fit 24 GB.",
        default="compute"), "base_weights"),
    "unload_text_encoders": Input("BOOLEAN", _tip(
        "Encode every caption once, then drop the text encoders before training (T5-XXL: 9.5 GB; Qwen3-4B: 8 GB).",
        default=False), "unload_text_encoders"),
}


def _model_output(strength: float) -> dict:
    return {
        "model": Input("MODEL", _tip("Optional: outputs this model with the new LoRA applied (wait mode), so one "
                                     "graph trains and samples.")),
        "strength": Input("FLOAT", _tip("Strength of the LoRA on the model output.", default=strength, min=-4.0,
                                        max=4.0, step=0.01)),
    }


# ---- the nodes ------------------------------------------------------------------------------------
FAIRHUMAN_LORA = {
    "required": {
        **PHOTOS,
        **_name_and_steps("my_fairhuman_lora", "models/loras"),
        "resolution": RESOLUTION,
        "rank": Input("INT", _tip("LoRA rank. Paper: 256.", default=256, min=1, max=1024), "rank"),
        "learning_rate": LEARNING_RATE,
        "weighting": WEIGHTING,
        "mode": MODE,
    },
    "optional": {
        "normalization": NORMALIZATION,
        **TRAINING,
        **_model_output(0.4),
        "fair_every": FAIR_EVERY,
        **GRAPH_DATA,
        "validate_every": VALIDATE_EVERY,
        "devices": DEVICES,
        **DIT_BASE,
        **FIT_GPU,
    },
}

FAIRHUMAN_CONTROLNET = {
    "required": {
        **PHOTOS,
        **_name_and_steps("my_fairhuman_controlnet", "models/controlnet"),
        "resolution": RESOLUTION,
        "learning_rate": LEARNING_RATE,
        "weighting": WEIGHTING,
        "mode": MODE,
    },
    "optional": {
        "condition_dropout": Input("FLOAT", _tip(
            "Probability that a photo's pose is hidden (black) in a step, so the ControlNet also learns without "
            "it. Paper: 0.3.", default=0.3, min=0.0, max=1.0, step=0.05), "condition_dropout"),
        "normalization": NORMALIZATION,
        **TRAINING,
        "fair_every": FAIR_EVERY,
        **GRAPH_DATA,
        "devices": DEVICES,
    },
}

HGDPO_LORA = {
    "required": {
        "ckpt_name": Input(CHECKPOINTS, _tip("The model to improve (paper: SD1.5); also makes the pairs.")),
        "prompts": Input("STRING", _tip("One prompt a line; each gives one preference pair. Ignored when 'pairs' "
                                        "names a folder.", multiline=True, default="a photo of a person waving\n")),
        "images_per_prompt": Input("INT", _tip(
            "Images generated and scored per prompt; the best and the worst make the pair. Paper: 20.", default=20,
            min=2, max=256)),
        "scorer": Input(list(SCORERS), _tip(
            "anatomy (built in, offline). " + " / ".join(s for s in SCORERS if s != "anatomy")
            + " need their weights in models/scorers/<name> (docs/scorers.md).", default="anatomy")),
        **_name_and_steps("my_hgdpo_lora", "models/loras"),
        "mode": MODE,
    },
    "optional": {
        "pairs": Input("STRING", _tip(
            "A pairs folder made by 'python -m trainers build-pairs', inside the input directory: trains on it "
            "instead of building pairs from the prompts.", default="")),
        "resolution": Input("INT", _tip("Side of the generated images and of training. SD1.5: 512.", default=512,
                                        min=64, max=4096, step=64), "resolution"),
        "rank": Input("INT", _tip("LoRA rank. Paper: 8.", default=8, min=1, max=1024), "rank"),
        "learning_rate": LEARNING_RATE,
        "sampling_steps": Input("INT", _tip("Sampler steps of each generated image.", default=30, min=1, max=200)),
        **TRAINING,
        **_model_output(0.5),
        "method": Input(DPO_METHODS, _tip(
            "hg-dpo: the paper's whole-image preference. fair-dpo: the preference split into global, face and hand "
            "terms (each image's own masks) combined by MPD, so hands and faces get their say.", default="hg-dpo")),
        "validate_every": VALIDATE_EVERY,
        "devices": DEVICES,
        **DIT_BASE,
        **FIT_GPU,
    },
}


# ---- reading a node's values ----------------------------------------------------------------------
def input_types(inputs: dict, model_files) -> dict:
    """A node's ``INPUT_TYPES()`` (``model_files(folder)``: a models folder's file names)."""
    return {group: {name: i.declaration(model_files) for name, i in declared.items()}
            for group, declared in inputs.items()}


def with_defaults(inputs: dict, values: dict) -> dict:
    """The node's values, each optional input left out (an older workflow, an unlinked socket)
    at its default; an unknown name is a TypeError, as for a function's keyword."""
    declared = {**inputs["required"], **inputs["optional"]}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise TypeError(f"unknown inputs {unknown}")
    return {name: values.get(name, i.options.get("default")) for name, i in declared.items()}


def trainer_options(inputs: dict, values: dict, device: str) -> dict:
    """{TrainConfig field: value} of the inputs that are trainer options, with the device the
    node resolved."""
    declared = {**inputs["required"], **inputs["optional"]}
    return {**{i.field: values[name] for name, i in declared.items() if i.field}, "device": device}
