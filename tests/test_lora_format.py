"""core.lora_format: kohya-layout LoRA files that diffusers and ComfyUI load key for key."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import comfyui_harness
from fixtures_checkpoints import unet_inputs, unet_output

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# Everything diffusers' kohya loader and ComfyUI both map, beyond the attention projections.
WIDE = ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                    "time_emb_proj", "conv_shortcut"]


def _adapted(base: str, targets, seed: int = 1):
    """A tiny pipeline whose UNet carries a peft LoRA with random non-zero A and B."""
    from peft import LoraConfig

    from core.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline(base)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=targets, init_lora_weights=False))
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("targets", [ATTENTION, WIDE], ids=["attention", "wide"])
def test_round_trip_through_diffusers(base, targets, tmp_path):
    from core.lora_format import save_lora
    from core.tiny_models import build_tiny_pipeline

    pipe = _adapted(base, targets)
    inputs = unet_inputs(pipe.unet)
    tuned = unet_output(pipe.unet, inputs)
    with torch.no_grad():
        pipe.unet.disable_adapters()
        plain = unet_output(pipe.unet, inputs)
        pipe.unet.enable_adapters()
    path = save_lora(tmp_path / "lora.safetensors", pipe.unet, metadata={"method": "fairhuman"})

    fresh = build_tiny_pipeline(base)
    fresh.load_lora_weights(str(path))
    loaded = unet_output(fresh.unet, inputs)
    assert (tuned - plain).abs().max() > 1e-2  # 100x the tolerance: the test can fail
    assert (loaded - tuned).abs().max() <= 1e-4


def test_peft_and_kohya_names():
    from core.lora_format import kohya_to_peft_state, peft_state_to_kohya

    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    for prefix, adapter in (("", ".default"), ("unet.", ""), ("base_model.model.", "")):
        kohya = peft_state_to_kohya({f"{prefix}{module}.lora_A{adapter}.weight": a,
                                     f"{prefix}{module}.lora_B{adapter}.weight": b}, alpha=8)
        name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
        assert set(kohya) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
        assert kohya[f"{name}.lora_down.weight"] is a and kohya[f"{name}.lora_up.weight"] is b
        assert kohya[f"{name}.alpha"].ndim == 0 and float(kohya[f"{name}.alpha"]) == 8.0
        state, alphas = kohya_to_peft_state(kohya)
        assert set(state) == {f"{module}.lora_A.weight", f"{module}.lora_B.weight"} and alphas == {module: 8.0}
    # Without alpha the scale is 1 (alpha = rank), as in kohya's and ComfyUI's loaders.
    _, alphas = kohya_to_peft_state({k: v for k, v in kohya.items() if not k.endswith("alpha")})
    assert alphas == {module: 4.0}


def test_name_guessing_matches_the_real_module_names():
    from core.lora_format import kohya_to_peft_state, peft_state_to_kohya

    pipe = _adapted("tiny-sdxl", WIDE + ["linear_1", "linear_2", "conv_in", "conv_out"])
    state = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    kohya = peft_state_to_kohya(state, alpha=2.0)
    guessed, _ = kohya_to_peft_state(kohya)
    exact, _ = kohya_to_peft_state(kohya, module_names=[n for n, _ in pipe.unet.named_modules()])
    assert set(guessed) == set(exact) == {n.replace(".default", "") for n in state}


def test_bad_states_give_clear_errors():
    from core.lora_format import kohya_to_peft_state, peft_state_to_kohya

    w = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="not both lora_A and lora_B"):
        peft_state_to_kohya({"m.lora_A.weight": w}, alpha=1)
    with pytest.raises(ValueError, match="several adapters"):
        peft_state_to_kohya({"m.lora_A.a.weight": w, "m.lora_B.a.weight": w,
                             "n.lora_A.b.weight": w, "n.lora_B.b.weight": w}, alpha=1)
    with pytest.raises(ValueError, match="DoRA"):
        peft_state_to_kohya({"m.lora_magnitude_vector.default.weight": w}, alpha=1)
    with pytest.raises(ValueError, match="not a peft LoRA weight name"):
        peft_state_to_kohya({"m.weight": w}, alpha=1)
    with pytest.raises(ValueError, match="not a kohya LoRA key"):
        kohya_to_peft_state({"lora_te_text_model_x.lora_down.weight": w})
    with pytest.raises(ValueError, match="needs both"):
        kohya_to_peft_state({"lora_unet_x.lora_down.weight": w})


def test_metadata_and_state_dict_input(tmp_path):
    from core.lora_format import load_lora_state, read_lora_metadata, save_lora

    pipe = _adapted("tiny-sd15", ATTENTION)
    state = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="needs alpha"):
        save_lora(tmp_path / "x.safetensors", state)
    meta = {"method": "fairhuman", "base_arch": "sd15", "objectives": ["global", "face", "hand"],
            "steps": 30, "final_weights": [0.5, 0.25, 0.25], "config": {"lr": 1e-5, "rank": 4}}
    path = save_lora(tmp_path / "x.safetensors", state, alpha=2.0, metadata=meta, dtype=torch.float16)
    with safe_open(str(path), "pt") as handle:
        raw = handle.metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items())
    assert raw["ss_network_dim"] == "4" and raw["ss_network_alpha"] == "2"
    assert raw["ss_base_model_version"] == "sd_v1"
    decoded = read_lora_metadata(path)
    for key, value in meta.items():
        assert decoded[f"fairhuman.{key}"] == value
    assert decoded["fairhuman.rank"] == 4 and decoded["fairhuman.alpha"] == 2.0
    tensors = load_lora_state(path)
    assert len(tensors) == 3 * len(state) // 2
    assert {t.dtype for k, t in tensors.items() if not k.endswith("alpha")} == {torch.float16}


def test_save_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous file intact and no temporary file."""
    import safetensors.torch

    from core.lora_format import load_lora_state, save_lora

    pipe = _adapted("tiny-sd15", ATTENTION)
    path = save_lora(tmp_path / "lora.safetensors", pipe.unet)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="No space"):
        save_lora(path, pipe.unet)
    assert path.read_bytes() == before and load_lora_state(path)
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_unreadable_files_name_the_file(tmp_path):
    from core.lora_format import load_lora_state, read_lora_metadata

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora_state(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_lora_state(corrupt)
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        read_lora_metadata(corrupt)
    other = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="other.safetensors.*not a kohya LoRA key"):
        load_lora_state(other)


# ---- full-size key coverage -------------------------------------------------------------------
def _full_size_kohya(arch: str) -> tuple[dict, dict]:
    """Kohya tensors (on the meta device: names and shapes only) for a LoRA on every Linear and
    Conv2d of a full-size UNet built from the shipped config, and that UNet's state-dict shapes."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from core.checkpoints.convert import shipped_config
    from core.lora_format import peft_state_to_kohya

    with torch.device("meta"):
        unet = UNet2DConditionModel(**shipped_config(f"{arch}_unet"))
    shapes = {k: list(v.shape) for k, v in unet.state_dict().items()}
    targets = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    state = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    return peft_state_to_kohya(state, alpha=4.0), shapes


def test_full_size_keys_map_to_diffusers_modules():
    """diffusers' kohya converter finds a module for every key (full-size SD1.5 and SDXL), except
    LoRAs on SDXL's add_embedding, whose layer index its converter drops (documented)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    for arch, cls in (("sd15", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)):
        kohya, shapes = _full_size_kohya(arch)
        converted, alphas = cls.lora_state_dict(dict(kohya))
        peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
        modules = {k.rsplit(".", 1)[0] for k in shapes}
        unmatched = {k.rsplit(".lora", 1)[0] for k in peft} - modules
        expected = {"add.embedding.linear"} if arch == "sdxl" else set()
        assert unmatched == expected, (arch, sorted(unmatched)[:5])
        assert len(alphas) == len(kohya) // 3 - len(expected)  # the two add_embedding alphas collide


_COMFY_CHECK = r"""
import json, logging, os, sys
sys.path.insert(0, os.getcwd())  # run from the ComfyUI tree
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.lora, comfy.model_detection

data = json.load(open(INPUT))
unloaded = []
class Catch(logging.Handler):
    def emit(self, record):
        if "lora key not loaded" in record.getMessage():
            unloaded.append(record.getMessage())
logging.getLogger().addHandler(Catch())
report = {}
for arch, item in data.items():
    meta = {k: torch.empty(s, device="meta") for k, s in item["unet_shapes"].items()}
    config = comfy.model_detection.model_config_from_diffusers_unet(meta)
    model = config.get_model({}, device="meta")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    lora = {k: (torch.tensor(4.0) if k.endswith(".alpha") else torch.empty(s, device="meta"))
            for k, s in item["lora_shapes"].items()}
    unloaded.clear()
    patches = comfy.lora.load_lora(lora, key_map)
    weights = model.state_dict()
    mismatched = []
    for name, s in item["lora_shapes"].items():
        if name.endswith(".lora_down.weight"):
            target = key_map.get(name[: -len(".lora_down.weight")])
            up = item["lora_shapes"][name.replace("lora_down", "lora_up")]
            if target is None or target not in weights or list(weights[target].shape[:2]) != [up[0], s[1]]:
                mismatched.append(name)
    report[arch] = {"model": type(config).__name__, "patches": len(patches),
                    "unloaded": list(unloaded), "mismatched": mismatched}
print("REPORT" + json.dumps(report))
"""


@pytest.mark.comfyui
@pytest.mark.slow
def test_comfyui_consumes_every_key_of_full_size_loras(tmp_path):
    """ComfyUI's own loader (model detection, key map, load_lora), run on full-size SD1.5 and SDXL
    UNets on the meta device: every key of our file is consumed and lands on a weight of the
    right shape, i.e. no "lora key not loaded"."""
    tree = comfyui_harness.comfyui_tree()
    python = comfyui_harness.comfyui_python(tree)
    data = {}
    for arch in ("sd15", "sdxl"):
        kohya, shapes = _full_size_kohya(arch)
        data[arch] = {"unet_shapes": shapes, "lora_shapes": {k: list(v.shape) for k, v in kohya.items()}}
    (tmp_path / "input.json").write_text(json.dumps(data))
    script = tmp_path / "check.py"
    script.write_text(_COMFY_CHECK.replace("INPUT", repr(str(tmp_path / "input.json"))))
    result = subprocess.run([str(python), str(script)], cwd=tree, capture_output=True, text=True, timeout=600)
    line = next((l for l in result.stdout.splitlines() if l.startswith("REPORT")), None)
    assert result.returncode == 0 and line, result.stderr[-3000:]
    report = json.loads(line[len("REPORT"):])
    assert report["sd15"]["model"] == "SD15" and report["sdxl"]["model"] == "SDXL"
    for arch, item in report.items():
        assert item["unloaded"] == [], (arch, item["unloaded"][:5])
        assert item["mismatched"] == [], (arch, item["mismatched"][:5])
        assert item["patches"] == len(data[arch]["lora_shapes"]) // 3, arch


def test_architecture_from_our_metadata_or_else_from_the_keys(tmp_path):
    """Our files name their family in the metadata (every family the pack trains, Z-Image too);
    a file without metadata is known by its key prefix, which cannot tell Flux from SD3 (both
    ``lora_transformer_``) nor SD1.5 from SDXL; the prefix's dot is literal."""
    from safetensors.torch import save_file

    from core.lora_format import kohya_to_peft_state, lora_architecture, lora_fits

    pair = {"lora_down.weight": torch.zeros(2, 8), "lora_up.weight": torch.zeros(8, 2)}
    ours = tmp_path / "ours.safetensors"
    save_file({f"diffusion_model.layers.0.attention.to_q.{k}": v for k, v in pair.items()}, str(ours),
              metadata={"fairhuman.base_arch": "zimage"})
    assert lora_architecture(ours) == "zimage"
    bare = tmp_path / "bare.safetensors"
    save_file({f"lora_transformer_transformer_blocks_0_attn_to_q.{k}": v for k, v in pair.items()}, str(bare))
    assert lora_architecture(bare) == "flux/sd3"
    assert lora_fits("flux/sd3", "flux") and lora_fits("flux/sd3", "sd3") and not lora_fits("flux/sd3", "sdxl")
    with pytest.raises(ValueError, match="not a kohya LoRA key"):
        kohya_to_peft_state({"diffusion_modelXlayers_0.lora_down.weight": torch.zeros(2, 8)})
