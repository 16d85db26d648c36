"""Loader nodes for the weights the trainers make: FairHuman LoRA, HG-DPO LoRA, FairHuman
ControlNet.

They load through ComfyUI's own machinery (so LoRAs from other trainers — kohya, diffusers,
PEFT layouts — load as with LoraLoader), and add what a user needs to trust the result: the
file's training metadata, a warning when the file was trained for another architecture than the
model's (the LoRA is then not applied: its tensors would not fit), and how many of the file's
keys were applied. A missing or corrupt file is an error that names the file.
"""
from __future__ import annotations

import json
import logging
import os

from ..core.lora_format import read_lora_metadata
from .job_paths import model_file
from .node_api import io

log = logging.getLogger("fairhuman-hgdpo")

ARCH_OF_COMFY_MODEL = {"SD15": "sd15", "SD20": "sd2", "SD21UnclipL": "sd2", "SDXL": "sdxl",
                       "SDXLRefiner": "sdxl-refiner", "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "Flux": "flux",
                       "FluxSchnell": "flux"}
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight",
                 ".lora.down.weight", ".lora.up.weight", ".lora_mid.weight", ".diff", ".diff_b", ".dora_scale")


def model_arch(model) -> str:
    name = type(model.model.model_config).__name__
    return ARCH_OF_COMFY_MODEL.get(name, name.lower())


def read_file(path: str) -> tuple[dict, dict]:
    """(tensors, training metadata) of a LoRA file, with an error naming a bad file."""
    import comfy.utils

    try:
        tensors = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as err:
        raise ValueError(f"cannot read LoRA file {path}: {err}") from None
    meta = {}
    if path.endswith(".safetensors"):
        meta = {k.removeprefix("fairhuman."): v for k, v in read_lora_metadata(path).items()
                if k.startswith("fairhuman.")}
    return tensors, meta


def _prefix(key: str) -> str:
    for suffix in LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def apply_lora(model, clip, path: str, strength_model: float, strength_clip: float, method: str):
    """Apply a LoRA file as ComfyUI's LoraLoader does; returns (model, clip, report text)."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd

    tensors, meta = read_file(path)
    name = os.path.basename(path)
    arch = model_arch(model)
    lines = [f"{name}: " + (", ".join(f"{k}={meta[k]}" for k in ("method", "base_arch", "rank", "alpha", "steps")
                                      if k in meta) or "no training metadata (another trainer's LoRA)")]
    trained_for = meta.get("base_arch")
    if trained_for and trained_for != arch:
        message = (f"{name} was trained for {trained_for}, the model is {arch}: LoRA not applied "
                   f"(its tensors do not fit this architecture)")
        log.warning(message)
        return model, clip, "\n".join(lines + ["WARNING: " + message])
    if meta.get("method") and meta["method"] != method:
        lines.append(f"note: a {meta['method']} LoRA loaded with the {method} loader")
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    converted = comfy.lora_convert.convert_lora(tensors)
    prefixes = {_prefix(k) for k in converted}
    unused = sorted(p for p in prefixes if p not in key_map)
    patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)
    lines.append(f"applied to {len(patches)} weights from {len(prefixes) - len(unused)} of {len(prefixes)} "
                 f"LoRA modules, strength {strength_model}")
    if unused:
        lines.append(f"WARNING: {len(unused)} LoRA modules match nothing in this model, e.g. {unused[0]}")
        log.warning("%s: %d LoRA modules not applied, e.g. %s", name, len(unused), unused[0])
    log.info("%s", "; ".join(lines))
    return new_model, new_clip, "\n".join(lines)


def _lora_inputs(tooltip: str, strength: float, strength_tooltip: str) -> list:
    """lora_name and strength, as both LoRA loaders take them."""
    import folder_paths

    return [io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip=tooltip),
            io.Float.Input("strength", default=strength, min=-4.0, max=4.0, step=0.01, tooltip=strength_tooltip)]


# what both LoRA loaders take and give: the model, and the model with the LoRA
def _model_input():
    return io.Model.Input("model", tooltip="The diffusion model to apply the LoRA to.")


def _model_output():
    return io.Model.Output(display_name="model", tooltip="The model with the LoRA.")


def _info_output(tooltip: str):
    """Every loader's last output: what the file is and what was applied."""
    return io.String.Output(display_name="info", tooltip=tooltip)


class FairHumanLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FairHumanLoraLoader", display_name="Load FairHuman LoRA", category="FairHuman",
            inputs=[_model_input(),
                    io.Clip.Input("clip", tooltip="The text encoder (FairHuman LoRAs leave it unchanged)."),
                    *_lora_inputs("A LoRA from models/loras (FairHuman's or any trainer's).", 0.4,
                                  "LoRA strength. The FairHuman paper uses 0.3-0.5.")],
            outputs=[_model_output(), io.Clip.Output(display_name="clip", tooltip="The text encoder with the LoRA."),
                     _info_output("What the file is (training metadata), how much of it was applied, warnings.")],
            description="Loads a FairHuman LoRA (better hands and faces), with its training metadata and an "
                        "architecture check.")

    @classmethod
    def execute(cls, model, clip, lora_name, strength):
        return io.NodeOutput(*apply_lora(model, clip, model_file("loras", lora_name), strength, strength, "fairhuman"))


class HGDPOLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HGDPOLoraLoader", display_name="Load HG-DPO LoRA", category="HG-DPO",
            inputs=[_model_input(), *_lora_inputs(
                "An HG-DPO LoRA from models/loras.", 0.5,
                "LoRA strength. HG-DPO recommends 0.5; pair with the LAN Sampler (reference = the model without the "
                "LoRA) at higher strengths.")],
            outputs=[_model_output(), _info_output("Training metadata, what was applied, warnings.")],
            description="Loads an HG-DPO LoRA (UNet only), with its training metadata and an architecture check.")

    @classmethod
    def execute(cls, model, lora_name, strength):
        new_model, _, info = apply_lora(model, None, model_file("loras", lora_name), strength, 0.0, "hg-dpo")
        return io.NodeOutput(new_model, info)


class FairHumanControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="FairHumanControlNetLoader", display_name="Load FairHuman ControlNet", category="FairHuman",
            inputs=[io.Combo.Input("control_net_name", options=folder_paths.get_filename_list("controlnet"),
                                   tooltip="A diffusers-layout ControlNet from models/controlnet.")],
            outputs=[io.ControlNet.Output(display_name="control_net", tooltip="Use with Apply ControlNet."),
                     _info_output("The file's training metadata.")],
            description="Loads a FairHuman ControlNet (diffusers layout) for Apply ControlNet.")

    @classmethod
    def execute(cls, control_net_name):
        return io.NodeOutput(*load_controlnet(model_file("controlnet", control_net_name)))


def load_controlnet(path: str):
    """(ComfyUI's CONTROL_NET, its training metadata as text) of a ControlNet file."""
    import comfy.controlnet

    meta = {}
    if path.endswith(".safetensors"):
        meta = {k.removeprefix("fairhuman."): v for k, v in read_lora_metadata(path).items()
                if k.startswith("fairhuman.")}
    try:
        control = comfy.controlnet.load_controlnet(path)
    except Exception as err:
        raise ValueError(f"cannot load ControlNet {path}: {err}") from None
    if control is None:
        raise ValueError(f"{path} is not a ControlNet ComfyUI recognizes")
    return control, json.dumps(meta) if meta else f"{os.path.basename(path)}: no training metadata"


NODES = [FairHumanLoraLoader, HGDPOLoraLoader, FairHumanControlNetLoader]
