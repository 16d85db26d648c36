"""core.checkpoints: tiny / diffusers-folder / original-layout single-file bases, offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfyui_harness
from fixtures_checkpoints import unet_inputs, unet_output

PACK_ROOT = Path(__file__).resolve().parents[1]


def _components(pipe):
    return [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]


def _same(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return torch.equal(a, b) if atol == 0 else torch.allclose(a, b, rtol=0, atol=atol)


@torch.no_grad()
def _assert_same_pipeline(loaded, original, atol: float = 0.0):
    """Same UNet output, text encodings and VAE decode: the same model, not only the same keys."""
    inputs = unet_inputs(original.unet)
    assert _same(unet_output(loaded.unet, inputs), unet_output(original.unet, inputs), atol)
    ids = original.tokenizer(["a photo of two people waving"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
    assert torch.equal(loaded.tokenizer(["a photo of two people waving"], padding="max_length",
                                        max_length=77, return_tensors="pt").input_ids, ids)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(original, name, None) is None:
            continue
        a = getattr(original, name)(ids, output_hidden_states=True)
        b = getattr(loaded, name)(ids, output_hidden_states=True)
        assert _same(a.hidden_states[-2], b.hidden_states[-2], atol), name
        assert _same(a[0], b[0], atol), name  # last hidden state / projected pooled embedding
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert _same(loaded.vae.decode(latents).sample, original.vae.decode(latents).sample, atol)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_loads_the_same_model_offline(arch, tiny_single_files, tiny_sd15, tiny_sdxl, no_network):
    from core.checkpoints import load_pipeline

    original = {"sd15": tiny_sd15, "sdxl": tiny_sdxl}[arch]
    loaded = load_pipeline(str(tiny_single_files[arch]))
    assert type(loaded) is type(original)
    assert type(loaded.scheduler) is type(original.scheduler)
    assert loaded.scheduler.config.prediction_type == "epsilon"
    for name in _components(original):
        a, b = getattr(original, name).config, getattr(loaded, name).config
        for key in ("block_out_channels", "layers_per_block", "transformer_layers_per_block",
                    "cross_attention_dim", "hidden_size", "num_hidden_layers", "projection_dim"):
            if hasattr(a, key) or (isinstance(a, dict) and key in a):
                va, vb = (a[key], b[key]) if isinstance(a, dict) else (getattr(a, key), getattr(b, key))
                if isinstance(va, int) and isinstance(vb, (list, tuple)):  # 1 == [1, 1, 1, 1]
                    va = [va] * len(vb)
                assert list(va) == list(vb) if isinstance(va, (list, tuple)) else va == vb, (name, key)
    _assert_same_pipeline(loaded, original)


@pytest.mark.slow
def test_widths_come_from_tensor_shapes(tmp_path, no_network):
    """Other widths than the tiny defaults: the loader reads them from the tensors (the file's
    metadata only carries group count, head count and activation, which shapes cannot tell)."""
    from diffusers import StableDiffusionXLPipeline

    from core.checkpoints.convert import STRUCTURE_KEY
    from ldm_export import save_single_file
    from core.checkpoints import load_pipeline
    from core.tiny_models import TinySpec, tiny_sdxl_components

    spec = TinySpec(text_hidden=16, text_layers=3, unet_channels=(16, 24, 40), vae_channels=(8, 16, 16, 24))
    original = StableDiffusionXLPipeline(**tiny_sdxl_components(seed=3, spec=spec))
    path = save_single_file(original, tmp_path / "other.safetensors")
    structure = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()[STRUCTURE_KEY])
    assert set(structure["unet"]) == {"norm_num_groups", "attention_head_dim", "sample_size"}
    loaded = load_pipeline(str(path))
    assert list(loaded.unet.config.block_out_channels) == [16, 24, 40]
    assert loaded.unet.config.addition_time_embed_dim == 8
    assert list(loaded.vae.config.block_out_channels) == [8, 16, 16, 24]
    assert loaded.text_encoder_2.config.num_hidden_layers == 3
    _assert_same_pipeline(loaded, original)


def test_published_architecture_defaults_without_structure_metadata(tmp_path, tiny_sd15):
    """A file without this pack's metadata (any real checkpoint) gets the published head count."""
    from core.checkpoints.convert import unet_config, strip_prefix, UNET_PREFIX
    from ldm_export import pipeline_to_ldm

    state, _ = pipeline_to_ldm(tiny_sd15)
    config = unet_config(strip_prefix(state, UNET_PREFIX), "sd15")
    assert config["attention_head_dim"] == 8 and config["norm_num_groups"] == 32
    assert config["block_out_channels"] == [32, 32, 64, 64]


@pytest.mark.slow
def test_diffusers_folder(tmp_path, tiny_sd15, no_network):
    from core.checkpoints import load_pipeline

    tiny_sd15.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(str(tmp_path / "pipe"))
    # diffusers' loader keeps the file's memory-mapped tensors; CPU kernels on them differ from
    # freshly allocated ones by ~1e-7 (the single-file loader copies and is bitwise equal).
    _assert_same_pipeline(loaded, tiny_sd15, atol=1e-5)


def test_tiny_bases_and_dtype(tiny_single_files):
    from core.checkpoints import load_pipeline

    assert load_pipeline("tiny-sdxl").unet.config.addition_embed_type == "text_time"
    pipe = load_pipeline(str(tiny_single_files["sd15"]), dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}


def test_architecture_from_keys(tiny_single_files):
    from core.checkpoints import architecture

    for arch, path in tiny_single_files.items():
        assert architecture(load_file(str(path)).keys()) == arch
    with pytest.raises(ValueError, match="SD2"):
        architecture(["model.diffusion_model.x", "first_stage_model.y", "cond_stage_model.model.token_embedding.weight"])
    with pytest.raises(ValueError, match="unrecognised checkpoint layout.*found UNet"):
        architecture(["model.diffusion_model.input_blocks.0.0.weight"])
    with pytest.raises(ValueError, match="none of them"):
        architecture(["lora_unet_x.lora_down.weight"])


def test_bad_bases_give_clear_errors(tmp_path, tiny_single_files):
    from core.checkpoints import load_pipeline

    with pytest.raises(FileNotFoundError, match="neither tiny-sd15"):
        load_pipeline(str(tmp_path / "missing.safetensors"))
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_pipeline(str(tmp_path / "model.ckpt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(Path(tiny_single_files["sd15"]).read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read checkpoint .*corrupt.safetensors"):
        load_pipeline(str(corrupt))
    lora_like = tmp_path / "lora.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, str(lora_like))
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        load_pipeline(str(lora_like))


# ---- tokenizers for the real CLIP vocabulary --------------------------------------------------
def _real_vocab_checkpoint(tiny_sdxl, path: Path) -> Path:
    """The tiny SDXL model with 49408-token embeddings: a real CLIP vocabulary at tiny width."""
    from ldm_export import pipeline_to_ldm

    state, metadata = pipeline_to_ldm(tiny_sdxl)
    g = torch.Generator().manual_seed(0)
    for key in ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                "conditioner.embedders.1.model.token_embedding.weight"):
        state[key] = torch.randn(49408, state[key].shape[1], generator=g) * 0.02
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def _comfy_tokenizer() -> Path:
    tree = comfyui_harness.comfyui_tree()
    folder = tree / "comfy" / "sd1_tokenizer" if tree else None
    if folder is None or not (folder / "vocab.json").is_file():
        pytest.skip("needs ComfyUI's comfy/sd1_tokenizer (set COMFYUI_PATH)")
    return folder


def test_real_vocabulary_needs_a_local_tokenizer(tmp_path, tiny_sdxl, monkeypatch, no_network):
    from core.checkpoints import load_pipeline

    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    path = _real_vocab_checkpoint(tiny_sdxl, tmp_path / "real_vocab.safetensors")
    with pytest.raises(FileNotFoundError, match="--tokenizer.*COMFYUI_PATH"):
        load_pipeline(str(path))
    with pytest.raises(FileNotFoundError, match="no vocab.json"):
        load_pipeline(str(path), tokenizer=str(tmp_path))


def test_real_vocabulary_tokenizer_sources(tmp_path, tiny_sdxl, monkeypatch, no_network):
    from core.checkpoints import load_pipeline

    folder = _comfy_tokenizer()
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    path = _real_vocab_checkpoint(tiny_sdxl, tmp_path / "real_vocab.safetensors")

    # 1. an explicit folder
    pipe = load_pipeline(str(path), tokenizer=str(folder))
    ids = pipe.tokenizer("a photo of a person", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2533, 49407] and ids[7] == 49407
    ids_2 = pipe.tokenizer_2("a photo of a person", padding="max_length", max_length=77).input_ids
    assert ids_2[:7] == ids[:7] and ids_2[7] == 0  # "!" pads SDXL's second tokenizer
    assert pipe.text_encoder_2.config.eos_token_id == 49407
    prompt_embeds = pipe.encode_prompt("a photo of a person", device="cpu", do_classifier_free_guidance=False)
    assert torch.isfinite(prompt_embeds[0]).all()

    # 2. COMFYUI_PATH
    monkeypatch.setenv("COMFYUI_PATH", str(folder.parents[1]))
    assert load_pipeline(str(path)).tokenizer.vocab_size == 49408
    monkeypatch.delenv("COMFYUI_PATH")

    # 3. the checkpoint sits in <tree>/models/checkpoints/
    tree = tmp_path / "ComfyUI"
    (tree / "comfy").mkdir(parents=True)
    (tree / "comfy" / "sd1_tokenizer").symlink_to(folder, target_is_directory=True)
    (tree / "models" / "checkpoints").mkdir(parents=True)
    inside = tree / "models" / "checkpoints" / "real_vocab.safetensors"
    path.rename(inside)
    assert load_pipeline(str(inside)).tokenizer_2.pad_token == "!"


@pytest.mark.slow
def test_loading_needs_no_network_in_a_fresh_process(tiny_single_files, tiny_sd15, tmp_path):
    """HF_HUB_OFFLINE, a proxy that goes nowhere and a socket guard, in a fresh interpreter."""
    tiny_sd15.save_pretrained(tmp_path / "pipe")
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise SystemExit('network access attempted')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "from core.checkpoints import load_pipeline\n"
        "import sys\n"
        "for base in sys.argv[1:]:\n"
        "    pipe = load_pipeline(base)\n"
        "    print(type(pipe).__name__, pipe.unet.config.block_out_channels)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9",
               PYTHONPATH=str(PACK_ROOT))
    env.pop("COMFYUI_PATH", None)
    bases = [str(tiny_single_files["sd15"]), str(tiny_single_files["sdxl"]), str(tmp_path / "pipe"), "tiny-sdxl"]
    result = subprocess.run([sys.executable, "-c", code, *bases], cwd=PACK_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Pipeline") == 4, result.stdout
