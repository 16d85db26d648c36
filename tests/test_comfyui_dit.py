"""Flow-matching DiT bases in a real ComfyUI: a Flux.1 diffusion model built with ComfyUI's own
classes (small widths that ComfyUI's detection still reads as Flux.1-dev) loads through
UNETLoader; a LoRA written by this pack's exporter applies with every key (none "not loaded",
each on a weight of its shape), changes the sample, and the LAN Sampler runs the graph.

The full-size key check builds Flux.1-dev on the meta device on both sides: the pack's LoRA on
diffusers' transformer (the trainer's own targets), ComfyUI's model from its detection.

Text encoders are left out: Flux's T5-XXL alone has 4.7 B parameters. A test-only node
(``tests/comfy_test_nodes/seeded_conditioning.py``) gives the graphs seeded conditioning of the
model's width instead; what is tested is the diffusion model, its LoRA and the samplers."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import comfyui_harness
from comfyui_harness import save_latent

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "comfy_scripts" / "dit_models.py"
TEST_NODES = HERE / "comfy_test_nodes"

# Small Flux.1-dev: 2 heads of 128 (ComfyUI derives the heads from the width and Flux's RoPE axes,
# 16+56+56), one double- and one single-stream block, a 64-wide context, CLIP-L's pooled width.
SMALL_FLUX = {"hidden_size": 256, "depth": 1, "depth_single_blocks": 1, "context_in_dim": 64, "vec_in_dim": 768}
FULL_FLUX = {"hidden_size": 3072, "depth": 19, "depth_single_blocks": 38, "context_in_dim": 4096, "vec_in_dim": 768}


def comfy_script(tree: Path, *args) -> dict:
    python = comfyui_harness.comfyui_python(tree)
    result = subprocess.run([str(python), str(SCRIPT), *map(str, args)], cwd=tree, capture_output=True, text=True,
                            timeout=900)
    line = next((l for l in result.stdout.splitlines() if l.startswith("REPORT")), None)
    assert result.returncode == 0 and line, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(line[len("REPORT"):])


def diffusers_flux(widths: dict, device="cpu"):
    """diffusers' Flux transformer of the same shape as ComfyUI's ``widths`` (Flux.1-dev's RoPE axes
    and guidance embedding)."""
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        return FluxTransformer2DModel(
            in_channels=64, num_layers=widths["depth"], num_single_layers=widths["depth_single_blocks"],
            attention_head_dim=128, num_attention_heads=widths["hidden_size"] // 128,
            joint_attention_dim=widths["context_in_dim"], pooled_projection_dim=widths["vec_in_dim"],
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def pack_lora(transformer, path: Path, rank: int = 4, seed: int = 0) -> Path:
    """The trainer's LoRA (its targets on Flux, its exporter), with random up weights so it acts."""
    from core.families.flux import FluxFamily
    from trainers.config import LORA_TARGETS
    from trainers.trainables import LoraTrainable

    lora = LoraTrainable(rank=rank, target_modules=LORA_TARGETS)
    lora.attach(transformer, torch.float32, False, targets_for=FluxFamily.lora_targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if param.device.type != "meta" and "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return lora.export(path, {"method": "test"})


def test_full_size_flux_lora_keys_all_load_in_comfyui(tmp_path):
    """Every key of the pack's Flux.1-dev LoRA (rank 4 on the trainer's targets) lands in
    ComfyUI's Flux model on a weight of its shape: no "lora key not loaded"."""
    from core.lora_format import peft_state_to_kohya

    tree = comfyui_harness.comfyui_tree()
    if tree is None:
        pytest.skip(comfyui_harness.missing_reason())
    from core.families.flux import FluxFamily
    from trainers.config import LORA_TARGETS
    from trainers.trainables import LoraTrainable

    transformer = diffusers_flux(FULL_FLUX, device="meta")
    lora = LoraTrainable(rank=4, target_modules=LORA_TARGETS)
    lora.attach(transformer, torch.float32, False, targets_for=FluxFamily.lora_targets)
    kohya = peft_state_to_kohya(dict(lora.named_parameters()), alpha=4.0, prefix=FluxFamily.lora_prefix)
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({k: list(v.shape) for k, v in kohya.items()}))
    report = comfy_script(tree, "check", "flux", json.dumps(FULL_FLUX), shapes)
    assert report["model"] == "Flux" and report["detected"] == FULL_FLUX
    assert report["unloaded"] == [] and report["mismatched"] == [], report
    assert report["patches"] == len(kohya) // 3 == 19 * 8 + 38 * 3  # double: 4 + 4 twins; single: q, k, v


@pytest.fixture(scope="module")
def flux_server(tmp_path_factory):
    """The newest ComfyUI tree, with the small Flux built by its own classes and the test-only
    conditioning node; skips where that tree's detection reads no Flux width from the weights."""
    trees = comfyui_harness.comfyui_trees()
    if not trees:
        pytest.skip(comfyui_harness.missing_reason())
    tree = trees[-1]
    base = tmp_path_factory.mktemp(f"dit-{comfyui_harness.version_label(tree)}")
    model = base / "small-flux-dev.safetensors"
    report = comfy_script(tree, "build", "flux", json.dumps(SMALL_FLUX), model)
    if report["detected"] != SMALL_FLUX:
        pytest.skip(f"ComfyUI {comfyui_harness.version_label(tree)} detects Flux only at Flux.1's own width "
                    f"({report['detected']})")
    server = comfyui_harness.ComfyServer(base, tree=tree)
    shutil.copy(TEST_NODES / "seeded_conditioning.py", base / "custom_nodes" / "seeded_conditioning.py")
    server.start()
    lora = pack_lora(diffusers_flux(SMALL_FLUX), base / "small-flux-lora.safetensors")
    yield server, server.add_model("diffusion_models", model), server.add_model("loras", lora)
    server.stop()


def test_flux_unet_loader_lora_and_lan_sampler_run_a_graph(flux_server):
    server, model, lora = flux_server
    common = {"seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
              "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0]}
    conditioning = {"tokens": 8, "width": SMALL_FLUX["context_in_dim"], "pooled_width": SMALL_FLUX["vec_in_dim"],
                    "guidance": 3.5}
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model, "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                              "strength_model": 1.0}},
        "3": {"class_type": "TestSeededConditioning", "inputs": {"seed": 1, **conditioning}},
        "4": {"class_type": "TestSeededConditioning", "inputs": {"seed": 2, **conditioning}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **common}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **common}},
        "8": {"class_type": "FairHumanLANSampler", "inputs": {"model": ["2", 0], "reference_model": ["1", 0],
                                                              "lan_strength": 1.0, **common}},
        "9": save_latent("6", "flux_base"), "10": save_latent("7", "flux_lora"), "11": save_latent("8", "flux_lan"),
    }
    before = len(server.log())
    server.run(graph, timeout=900)
    log = server.log()[before:]
    assert "lora key not loaded" not in log and "ERROR lora" not in log, log[-3000:]
    base, tuned, lan = (server.latest_latent(p) for p in ("flux_base", "flux_lora", "flux_lan"))
    assert base.shape == tuned.shape == lan.shape == (1, 16, 8, 8)
    assert torch.isfinite(tuned).all() and torch.isfinite(lan).all()
    assert (tuned - base).abs().max() > 1e-3  # the LoRA acts on the sample
    # LAN on ComfyUI's flow sampler: the tuned trajectory takes the reference's per-channel
    # statistics after every step, and keeps its own content
    dims = (2, 3)
    assert torch.allclose(lan.mean(dims), base.mean(dims), atol=1e-4)
    assert torch.allclose(lan.std(dims, unbiased=False), base.std(dims, unbiased=False), atol=1e-4)
    assert not torch.allclose(lan, base, atol=1e-3)
