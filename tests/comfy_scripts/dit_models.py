"""Run by a ComfyUI tree's own Python (cwd: the tree), never imported by the pack: builds DiT
diffusion models with ComfyUI's own classes and checks LoRA files against ComfyUI's key map.

    python dit_models.py build  <cases.json>   # {name: {family, widths, out}}
    python dit_models.py check  <cases.json>   # {name: {family, widths, lora_shapes}}

Both print one line ``REPORT{json}``, a report per case name (one process: importing ComfyUI
takes most of the time). ``build`` makes ComfyUI's model detection pick the config
(from a state dict holding only the tensors detection reads), builds that model with seeded random
weights and saves its diffusion-model state dict, as UNETLoader reads it from
models/diffusion_models. ``check`` builds the model on the meta device and loads the LoRA's
(meta) tensors through ``comfy.lora``: the keys ComfyUI leaves unloaded and those landing on a
weight of another shape are reported."""
import json
import logging
import os
import sys

sys.path.insert(0, os.getcwd())
command, cases = sys.argv[1], json.load(open(sys.argv[2]))
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.model_detection  # noqa: E402


def detection_keys(family: str, w: dict) -> dict:
    """The tensors (meta) from which ComfyUI's detection reads the family and its widths."""
    h = w["hidden_size"]
    shapes = {}
    if family == "flux":
        shapes = {"img_in.weight": [h, 64], "txt_in.weight": [h, w["context_in_dim"]],
                  "vector_in.in_layer.weight": [h, w["vec_in_dim"]], "guidance_in.in_layer.weight": [h, 256]}
        for i in range(w["depth"]):
            shapes[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = [128]
        for i in range(w["depth_single_blocks"]):
            shapes[f"single_blocks.{i}.norm.key_norm.scale"] = [128]
    elif family == "sd3":  # MMDiT: 64-wide heads, as many joint blocks as heads
        shapes = {"x_embedder.proj.weight": [h, 16, 2, 2], "final_layer.linear.weight": [2 * 2 * 16, h],
                  "y_embedder.mlp.0.weight": [h, w["adm_in_channels"]],
                  "context_embedder.weight": [h, w["context_in_dim"]],
                  "pos_embed": [1, w["pos_embed_max_size"] ** 2, h]}
        for i in range(h // 64):
            shapes[f"joint_blocks.{i}.context_block.attn.qkv.weight"] = [3 * h, h]
            shapes[f"joint_blocks.{i}.context_block.attn.ln_q.weight"] = [64]
        for i in w["x_block_self_attn_layers"]:
            shapes[f"joint_blocks.{i}.x_block.attn2.qkv.weight"] = [3 * h, h]
    else:
        raise SystemExit(f"unknown family {family}")
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def model_for(family: str, w: dict, device):
    keys = detection_keys(family, w)
    unet_config = comfy.model_detection.detect_unet_config(keys, "")
    config = comfy.model_detection.model_config_from_unet_config(unet_config, keys)
    if config is None:
        raise SystemExit(f"ComfyUI recognises no model in {unet_config}")
    return config, config.get_model({}, device=device), unet_config


def detected(unet_config: dict, w: dict) -> dict:
    """What detection read, under the names of ``w`` (MMDiT's width is 64 × its depth)."""
    flat = dict(unet_config)
    if "context_embedder_config" in flat:
        flat["context_in_dim"] = flat["context_embedder_config"]["params"]["in_features"]
    flat.setdefault("hidden_size", 64 * flat.get("depth", 0))
    return {k: flat.get(k) for k in w}


def build(family, widths, out):
    config, model, unet_config = model_for(family, widths, "cpu")
    report = {"model": type(config).__name__, "detected": detected(unet_config, widths)}
    if report["detected"] == widths:  # else this ComfyUI would build another size: nothing written
        g = torch.Generator().manual_seed(0)
        state = {}
        for name, tensor in model.diffusion_model.state_dict().items():
            scale = 1.0 if name.endswith((".scale", "norm.weight", "ln_q.weight", "ln_k.weight")) else 0.02
            state[name] = (torch.ones(tensor.shape) if scale == 1.0 else torch.randn(tensor.shape, generator=g) * scale)
        from safetensors.torch import save_file

        save_file(state, out)
        report["tensors"] = len(state)
    return report


class Unloaded(logging.Handler):
    """The keys ComfyUI's LoRA loader reports as not loaded."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        if "lora key not loaded" in record.getMessage():
            self.messages.append(record.getMessage())


def check(family, widths, lora_shapes):
    unloaded = Unloaded()
    logging.getLogger().addHandler(unloaded)
    config, model, unet_config = model_for(family, widths, "meta")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    shapes = lora_shapes
    lora = {k: torch.tensor(4.0) if k.endswith(".alpha") else torch.empty(s, device="meta") for k, s in shapes.items()}
    patches = comfy.lora.load_lora(lora, key_map)
    weights = {k: list(v.shape) for k, v in model.state_dict().items()}
    mismatched = []
    for name, down in shapes.items():
        if not name.endswith(".lora_down.weight"):
            continue
        target = key_map.get(name[: -len(".lora_down.weight")])
        up = shapes[name.replace("lora_down", "lora_up")]
        if isinstance(target, tuple):  # a slice of a fused weight: (key, (dim, start, size))
            key, (dim, _start, size) = target
            shape = list(weights.get(key, []))
            if shape:
                shape[dim] = size
        else:
            shape = weights.get(target)
        if not shape or shape[:2] != [up[0], down[1]]:
            mismatched.append(name)
    logging.getLogger().removeHandler(unloaded)
    return {"model": type(config).__name__, "patches": len(patches), "unloaded": unloaded.messages,
            "mismatched": mismatched, "detected": detected(unet_config, widths)}


run = {"build": build, "check": check}[command]
print("REPORT" + json.dumps({name: run(**case) for name, case in cases.items()}))
