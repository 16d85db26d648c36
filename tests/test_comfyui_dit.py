"""Flow-matching DiT bases in a real ComfyUI: a Flux.1 and an SD3.5 diffusion model built with
ComfyUI's own classes (small widths that ComfyUI's detection still reads as that family) load
through UNETLoader; a LoRA written by this pack's exporter applies with every key (none "not
loaded", each on a weight of its shape), changes the sample, and the LAN Sampler runs the graph.

The full-size key checks build Flux.1-dev, SD3.5 Medium, SD3.5 Large and Z-Image on the meta
device on both sides: the pack's LoRA on diffusers' transformer (the trainer's own targets for
that family), ComfyUI's model from its detection. (ComfyUI reads Z-Image only at its own 3840
width, so Z-Image has no small-model graph.)

Text encoders are left out: T5-XXL alone has 4.7 B parameters. A test-only node
(``tests/comfy_test_nodes/seeded_conditioning.py``) gives the graphs seeded conditioning of the
model's width instead; what is tested is the diffusion model, its LoRA and the samplers.

The Train nodes train on that Flux.1 from ComfyUI's folders (the trainer reads the diffusion model
with small text encoder files of its widths and a full-size random VAE): the shipped Flux.1
workflow, and Train HG-DPO LoRA building pairs with the Flux pipeline."""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import comfyui_harness
from comfyui_harness import save_latent

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "comfy_scripts" / "dit_models.py"
TEST_NODES = HERE / "comfy_test_nodes"


@dataclass(frozen=True)
class DiT:
    """One family as both sides build it: ComfyUI's widths (what its detection reads) and the
    diffusers transformer of the same shape, on which the pack's trainer puts its LoRA."""

    family: str  # the pack's (core.families.FAMILIES) and the ComfyUI script's name
    comfy_model: str  # ComfyUI's supported-model class
    widths: dict
    context_width: int  # the conditioning the graph feeds it: tokens of this width ...
    pooled_width: int  # ... and a pooled vector

    def diffusers_model(self, device="cpu"):
        w = self.widths
        with torch.device(device):
            if self.family == "flux":  # Flux.1-dev: RoPE axes 16+56+56 (so 128-wide heads), guidance
                from diffusers import FluxTransformer2DModel

                return FluxTransformer2DModel(
                    in_channels=64, num_layers=w["depth"], num_single_layers=w["depth_single_blocks"],
                    attention_head_dim=128, num_attention_heads=w["hidden_size"] // 128,
                    joint_attention_dim=w["context_in_dim"], pooled_projection_dim=w["vec_in_dim"],
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56))
            if self.family == "zimage":  # Z-Image: diffusers' defaults are its shape
                from diffusers import ZImageTransformer2DModel

                return ZImageTransformer2DModel(dim=w["dim"], n_layers=w["n_layers"], cap_feat_dim=w["cap_feat_dim"])
            from diffusers import SD3Transformer2DModel  # SD3.5: 64-wide heads, RMS q/k norm

            depth = w["hidden_size"] // 64
            return SD3Transformer2DModel(
                sample_size=w["pos_embed_max_size"], patch_size=2, in_channels=16, out_channels=16,
                num_layers=depth, attention_head_dim=64, num_attention_heads=depth,
                joint_attention_dim=w["context_in_dim"], caption_projection_dim=w["hidden_size"],
                pooled_projection_dim=w["adm_in_channels"], pos_embed_max_size=w["pos_embed_max_size"],
                dual_attention_layers=tuple(w["x_block_self_attn_layers"]), qk_norm="rms_norm")


def _flux(depth, single, hidden=3072, context=4096):
    return {"hidden_size": hidden, "depth": depth, "depth_single_blocks": single, "context_in_dim": context,
            "vec_in_dim": 768}


def _sd3(hidden, max_size, dual_layers, context=4096):
    return {"hidden_size": hidden, "adm_in_channels": 2048, "context_in_dim": context,
            "pos_embed_max_size": max_size, "x_block_self_attn_layers": list(dual_layers)}


FULL_SIZE = {
    "flux.1-dev": DiT("flux", "Flux", _flux(19, 38), 4096, 768),
    "sd3.5-medium": DiT("sd3", "SD3", _sd3(1536, 384, range(13)), 4096, 2048),
    "sd3.5-large": DiT("sd3", "SD3", _sd3(2432, 192, []), 4096, 2048),
    "z-image": DiT("zimage", "ZImage", {"dim": 3840, "n_layers": 30, "cap_feat_dim": 2560}, 2560, 0),
}
# Small: Flux with 2 heads of 128 and one block of each kind; SD3.5 Medium-shaped with 2 joint
# blocks of 64-wide heads, the first with MMDiT-X's second self-attention; 64-wide context.
SMALL = {
    "flux": DiT("flux", "Flux", _flux(1, 1, hidden=256, context=64), 64, 768),
    "sd3": DiT("sd3", "SD3", _sd3(128, 16, [0], context=64), 64, 2048),
}


def comfy_script(tree: Path, command: str, cases: dict, folder: Path) -> dict:
    """``comfy_scripts/dit_models.py`` in the tree's own Python: a report per case."""
    spec = folder / f"{command}-cases.json"
    spec.write_text(json.dumps(cases))
    python = comfyui_harness.comfyui_python(tree)
    result = subprocess.run([str(python), str(SCRIPT), command, str(spec)], cwd=tree, capture_output=True,
                            text=True, timeout=900)
    line = next((l for l in result.stdout.splitlines() if l.startswith("REPORT")), None)
    assert result.returncode == 0 and line, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(line[len("REPORT"):])


def attach_pack_lora(dit: DiT, transformer, rank: int = 4):
    """The trainer's LoRA on ``transformer``: its default targets as the family maps them."""
    from core.families import FAMILIES
    from trainers.config import LORA_TARGETS
    from trainers.trainables import LoraTrainable

    lora = LoraTrainable(rank=rank, target_modules=LORA_TARGETS)
    lora.attach(transformer, torch.float32, False, targets_for=FAMILIES[dit.family].lora_targets)
    return lora


@pytest.fixture(scope="module")
def full_size_reports(tmp_path_factory):
    """ComfyUI's verdict on the pack's full-size LoRA of each family (one ComfyUI process)."""
    from core.families import FAMILIES
    from core.lora_format import peft_state_to_kohya

    tree = comfyui_harness.comfyui_tree()
    if tree is None:
        pytest.skip(comfyui_harness.missing_reason())
    cases, key_counts = {}, {}
    for name, dit in FULL_SIZE.items():
        lora = attach_pack_lora(dit, dit.diffusers_model(device="meta"))
        kohya = peft_state_to_kohya(dict(lora.named_parameters()), alpha=4.0,
                                    prefix=FAMILIES[dit.family].lora_prefix)
        cases[name] = {"family": dit.family, "widths": dit.widths,
                       "lora_shapes": {k: list(v.shape) for k, v in kohya.items()}}
        key_counts[name] = len(kohya)
    return comfy_script(tree, "check", cases, tmp_path_factory.mktemp("dit-check")), key_counts


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_lora_keys_all_load_in_comfyui(full_size_reports, name):
    """Every key of the pack's full-size LoRA (rank 4 on the trainer's targets) lands in ComfyUI's
    model of that family on a weight of its shape: no "lora key not loaded"."""
    reports, key_counts = full_size_reports
    report, dit = reports[name], FULL_SIZE[name]
    assert report["model"] == dit.comfy_model and report["detected"] == dit.widths
    assert report["unloaded"] == [] and report["mismatched"] == [], report
    assert report["patches"] == key_counts[name] // 3 > 0


@pytest.fixture(scope="module")
def dit_server(tmp_path_factory):
    """The newest ComfyUI tree with the test-only conditioning node and the small models, built
    by its own classes (a report per family: what its detection read)."""
    trees = comfyui_harness.comfyui_trees()
    if not trees:
        pytest.skip(comfyui_harness.missing_reason())
    tree = trees[-1]
    base = tmp_path_factory.mktemp(f"dit-{comfyui_harness.version_label(tree)}")
    cases = {family: {"family": family, "widths": dit.widths, "out": str(base / f"small-{family}.safetensors")}
             for family, dit in SMALL.items()}
    built = comfy_script(tree, "build", cases, base)
    server = comfyui_harness.ComfyServer(base, tree=tree)
    shutil.copy(TEST_NODES / "seeded_conditioning.py", base / "custom_nodes" / "seeded_conditioning.py")
    server.start()
    yield server, built
    server.stop()


# heavy: a ComfyUI server of its own and two samplings per family (about 2 min on a 2-vCPU VM);
# CI runs the full-size key checks above
@pytest.mark.heavy
@pytest.mark.parametrize("family", list(SMALL))
def test_unet_loader_lora_and_lan_sampler_run_a_graph(dit_server, family):
    """The small model (ComfyUI's classes, seeded weights) through UNETLoader, the pack's LoRA
    through LoraLoaderModelOnly, KSampler with and without it, and the LAN Sampler."""
    (server, built), dit = dit_server, SMALL[family]
    model_file = server.base_dir / f"small-{family}.safetensors"
    if built[family]["detected"] != dit.widths:  # feature-detected: older trees assume the full width
        pytest.skip(f"ComfyUI {comfyui_harness.version_label(server.tree)} reads no {family} width from the "
                    f"weights ({built[family]['detected']})")
    lora = attach_pack_lora(dit, dit.diffusers_model())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random up weights, so the LoRA acts
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    lora_file = lora.export(server.base_dir / f"small-{family}-lora.safetensors", {"method": "test"})
    model, lora_name = server.add_model("diffusion_models", model_file), server.add_model("loras", lora_file)

    common = {"seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
              "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0]}
    conditioning = {"tokens": 8, "width": dit.context_width, "pooled_width": dit.pooled_width, "guidance": 3.5}
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model, "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                              "strength_model": 1.0}},
        "3": {"class_type": "TestSeededConditioning", "inputs": {"seed": 1, **conditioning}},
        "4": {"class_type": "TestSeededConditioning", "inputs": {"seed": 2, **conditioning}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **common}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **common}},
        "8": {"class_type": "FairHumanLANSampler", "inputs": {"model": ["2", 0], "reference_model": ["1", 0],
                                                              "lan_strength": 1.0, **common}},
        "9": save_latent("6", f"{family}_base"), "10": save_latent("7", f"{family}_lora"),
        "11": save_latent("8", f"{family}_lan"),
    }
    before = len(server.log())
    server.run(graph, timeout=900)
    log = server.log()[before:]
    assert "lora key not loaded" not in log and "ERROR lora" not in log, log[-3000:]
    base, tuned, lan = (server.latest_latent(f"{family}_{p}") for p in ("base", "lora", "lan"))
    assert base.shape == tuned.shape == lan.shape == (1, 16, 8, 8)
    assert torch.isfinite(tuned).all() and torch.isfinite(lan).all()
    assert (tuned - base).abs().max() > 1e-3  # the LoRA acts on the sample
    # LAN on ComfyUI's flow sampler: the tuned trajectory takes the reference's per-channel
    # statistics after every step, and keeps its own content
    dims = (2, 3)
    assert torch.allclose(lan.mean(dims), base.mean(dims), atol=1e-4)
    assert torch.allclose(lan.std(dims, unbiased=False), base.std(dims, unbiased=False), atol=1e-4)
    assert not torch.allclose(lan, base, atol=1e-3)


# ---- the shipped Flux.1 training workflow -------------------------------------------------------
FLUX_WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "train_fairhuman_lora_flux.json"


def flux_companions(folder: Path, dit: DiT) -> dict:
    """The files a Flux.1 diffusion model needs beside it, in ComfyUI's layouts: a CLIP-L-shaped
    encoder of the pooled width, a T5-shaped one of the context width (both small, for the
    trainer; the graph's own conditioning comes from the test node), and a full-size random Flux
    VAE (ComfyUI's VAELoader reads its widths as fixed)."""
    from core.tiny_models import FLUX_LATENT, FLUX_SCALING_FACTOR, _clip_config, _t5
    from dit_export import _clip_file, _t5_file, _vae_file
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    config = _clip_config(dit.pooled_width, 1)
    config.num_attention_heads = 12  # CLIP-L's heads: ComfyUI's files say nothing of them
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        scaling_factor=FLUX_SCALING_FACTOR, **FLUX_LATENT)
    return {"clip_l": _clip_file(CLIPTextModel(config), folder / "clip_l_small.safetensors"),
            "t5": _t5_file(_t5(dit.context_width, 1), folder / "t5_small.safetensors"),
            "vae": _vae_file(vae, folder / "ae_random.safetensors")}


@pytest.fixture(scope="module")
def flux_files(dit_server):
    """The small Flux.1 (ComfyUI's classes) and its companions in the server's model folders, by the
    names ComfyUI lists them under."""
    (server, built), dit = dit_server, SMALL["flux"]
    if built["flux"]["detected"] != dit.widths:
        pytest.skip(f"ComfyUI {comfyui_harness.version_label(server.tree)} reads no Flux width from the weights")
    files = flux_companions(server.base_dir, dit)
    return {"unet_name": server.add_model("diffusion_models", server.base_dir / "small-flux.safetensors"),
            "clip_l": server.add_model("text_encoders", files["clip_l"]),
            "t5": server.add_model("text_encoders", files["t5"]), "vae": server.add_model("vae", files["vae"])}


def run_flux_training(server, prompt: dict, output_name: str, method: str) -> tuple[dict, dict]:
    """Run a graph whose Train node (wait mode) trains ``output_name`` on the small Flux.1: its LoRA
    is in models/loras/fairhuman, made by ``method`` for Flux, and applied with every key. Returns
    (the prompt's history entry, the job's summary)."""
    from core.lora_format import read_lora_metadata

    before = len(server.log())
    entry = server.run(prompt, timeout=1800)
    log = server.log()[before:]
    lora = server.base_dir / "models" / "loras" / "fairhuman" / f"{output_name}.safetensors"
    assert lora.is_file(), log[-3000:]
    meta = read_lora_metadata(lora)
    assert meta["fairhuman.base_arch"] == "flux" and meta["fairhuman.method"] == method
    assert "lora key not loaded" not in log and "LoRA modules match nothing" not in log, log[-3000:]
    return entry, next(j for j in server.get("/fairhuman/jobs")["jobs"] if j["output_name"] == output_name)


@pytest.mark.heavy
def test_shipped_flux_workflow_trains_on_the_diffusion_model_and_samples_with_its_lora(dit_server, flux_files,
                                                                                         sample_photos):
    """workflows/train_fairhuman_lora_flux.json as the browser queues it: the Train node trains
    on the Flux.1 diffusion model ComfyUI's own classes built (read by the trainer from
    models/diffusion_models with its text encoders and VAE), with the workflow's fp8 base weights,
    gradient checkpointing and unloaded text encoders, 2 steps at 64 px; the LoRA lands in
    models/loras/fairhuman, applies to UNETLoader's model with every key, and the graph samples
    and decodes with it. Only the text encoding is the test node's (see the module docstring)."""
    from comfyui_harness import workflow_to_api

    (server, _), dit, names = dit_server, SMALL["flux"], flux_files
    photos = server.base_dir / "input" / "flux photos"
    photos.mkdir(parents=True, exist_ok=True)
    for path in sample_photos[:2]:
        shutil.copy(path, photos / path.name)

    api = workflow_to_api(json.loads(FLUX_WORKFLOW.read_text()), server.object_info())
    by_type = {node["class_type"]: node_id for node_id, node in api.items()}
    train = api[by_type["FairHumanTrainLoRA"]]["inputs"]
    assert (train["base_weights"], train["gradient_checkpointing"], train["unload_text_encoders"],
            train["mixed_precision"], train["ckpt_name"]) == ("fp8", True, True, "bf16", "none")  # the shipped recipe
    train.update(dataset="flux photos", output_name="flux workflow", steps=2, resolution=64, rank=4,
                 learning_rate=1e-3, checkpoint_every=0, diffusion_model=names["unet_name"],
                 text_encoder_1=names["t5"], text_encoder_2=names["clip_l"], vae=names["vae"])
    api[by_type["UNETLoader"]]["inputs"]["unet_name"] = names["unet_name"]
    api[by_type["VAELoader"]]["inputs"]["vae_name"] = names["vae"]
    del api[by_type["DualCLIPLoader"]]
    api[by_type["CLIPTextEncode"]] = {"class_type": "TestSeededConditioning", "inputs": {
        "seed": 1, "tokens": 8, "width": dit.context_width, "pooled_width": dit.pooled_width, "guidance": 3.5}}
    api[by_type["EmptySD3LatentImage"]]["inputs"].update(width=64, height=64)
    api[by_type["KSampler"]]["inputs"]["steps"] = 1

    entry, job = run_flux_training(server, api, "flux workflow", "fairhuman")
    images = server.outputs(entry, by_type["SaveImage"])
    assert images and all(p.is_file() for p in images)
    config = json.loads((Path(job["run_dir"]) / "train" / "config.json").read_text())
    assert (config["base_weights"], config["unload_text_encoders"]) == ("fp8", True)
    assert Path(config["base"]).name == names["unet_name"] and len(config["text_encoders"]) == 2


@pytest.mark.heavy
def test_hgdpo_node_builds_pairs_and_trains_on_a_flux_diffusion_model(dit_server, flux_files):
    """Train HG-DPO LoRA on the same Flux.1 files: pairs rendered by the Flux pipeline the trainer
    reads from ComfyUI's folders, scored, then one Fair DPO step; the LoRA applies to UNETLoader's
    model with every key."""
    (server, _), names = dit_server, flux_files
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": names["unet_name"], "weight_dtype": "default"}},
        "2": {"class_type": "HGDPOTrainLoRA", "inputs": {
            "ckpt_name": "none", "prompts": "a photo of a person waving\ntwo people shaking hands",
            "images_per_prompt": 2, "scorer": "anatomy", "output_name": "flux dpo", "steps": 1, "mode": "wait",
            "resolution": 64, "rank": 4, "learning_rate": 1e-3, "sampling_steps": 2, "mixed_precision": "no",
            "checkpoint_every": 0, "method": "fair-dpo", "model": ["1", 0], "diffusion_model": names["unet_name"],
            "text_encoder_1": names["clip_l"], "text_encoder_2": names["t5"], "vae": names["vae"]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    _, job = run_flux_training(server, graph, "flux dpo", "fair-dpo")
    pairs = [json.loads(line) for line in (Path(job["run_dir"]) / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 2
