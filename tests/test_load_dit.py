"""core.checkpoints on ComfyUI's separate files: Flux.1, SD3.5 and Z-Image diffusion models with
their text encoder and VAE files (tests/dit_export.py writes the tiny models in those layouts),
the diffusers folders of their pipelines, the refusals, and the real-size key layouts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import comfyui_harness
from dit_export import export_comfy_files, flux_to_bfl, sd3_to_mmdit, zimage_to_nextdit

FAMILIES = {"tiny-flux": "FluxPipeline", "tiny-sd3": "StableDiffusion3Pipeline", "tiny-zimage": "ZImagePipeline"}
PROMPTS = ["a photo of two people waving", "a child holding hands"]


@pytest.fixture(scope="module")
def tiny(request):
    from core.tiny_models import build_tiny_pipeline

    cache = {}

    def get(base):
        if base not in cache:
            cache[base] = build_tiny_pipeline(base)
        return cache[base]

    return get


@pytest.fixture(scope="module")
def comfy_files(tiny, tmp_path_factory):
    """{base: files} with the encoders listed in reverse order: roles come from keys, not order."""
    cache = {}

    def get(base, prefix=""):
        if (base, prefix) not in cache:
            files = export_comfy_files(tiny(base), tmp_path_factory.mktemp(base), prefix)
            cache[base, prefix] = {"text_encoders": [str(p) for p in reversed(files["text_encoders"])],
                                   "vae": str(files["vae"]), "base": str(files["base"])}
        return cache[base, prefix]

    return get


@torch.no_grad()
def assert_same_pipeline(loaded, original):
    """The loaded pipeline conditions, predicts and decodes exactly as the tiny one, through the
    family seam the trainer uses (tokenizers, text encoders, transformer, VAE)."""
    from core.families import family_of

    assert type(loaded) is type(original)
    def settings(scheduler):
        return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}

    assert settings(loaded.scheduler) == settings(original.scheduler)
    a, b = family_of(original), family_of(loaded)
    cond_a, cond_b = a.encode_prompts(PROMPTS, torch.float32), b.encode_prompts(PROMPTS, torch.float32)
    assert torch.equal(cond_a.hidden, cond_b.hidden)
    if cond_a.pooled is not None:
        assert torch.equal(cond_a.pooled, cond_b.pooled)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 16, 8, 8, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    out_a = a.predict(noisy, sigmas, cond_a, None, None, None)
    assert torch.equal(out_a, b.predict(noisy, sigmas, cond_b, None, None, None))
    assert out_a.abs().sum() > 0
    latents = torch.randn(1, 16, 8, 8, generator=g)
    assert torch.equal(loaded.vae.decode(latents).sample, original.vae.decode(latents).sample)
    assert loaded.vae.config.scaling_factor == original.vae.config.scaling_factor
    assert loaded.vae.config.shift_factor == original.vae.config.shift_factor


@pytest.mark.parametrize("base", list(FAMILIES))
def test_comfyui_files_load_the_same_model(base, tiny, comfy_files, no_network):
    from core.checkpoints import load_pipeline

    files = comfy_files(base)
    loaded = load_pipeline(files["base"], text_encoders=files["text_encoders"], vae=files["vae"])
    assert_same_pipeline(loaded, tiny(base))


def test_the_trainer_reads_a_dit_file_in_its_compute_dtype_and_the_vae_in_fp32(comfy_files, no_network):
    """Flux.1-dev read in fp32 would need 48 GB before the dtype policy cast it: a DiT file loads
    straight into the compute dtype (the VAE stays fp32); the other bases load as before."""
    from types import SimpleNamespace

    from trainers.train_job import load_base

    files = comfy_files("tiny-flux")
    cfg = SimpleNamespace(base=files["base"], tokenizer="", text_encoders=files["text_encoders"], vae=files["vae"])
    pipe = load_base(cfg, torch.bfloat16)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    tiny_sd15 = load_base(SimpleNamespace(base="tiny-sd15", tokenizer="", text_encoders=[], vae=""), torch.bfloat16)
    assert tiny_sd15.unet.dtype == tiny_sd15.vae.dtype == torch.float32  # cast later by the dtype policy


def test_full_checkpoint_prefix_loads_too(tiny, comfy_files, no_network):
    """A diffusion model under model.diffusion_model. (as in full checkpoints) is the same model."""
    from core.checkpoints import load_pipeline

    files = comfy_files("tiny-flux", "model.diffusion_model.")
    loaded = load_pipeline(files["base"], text_encoders=files["text_encoders"], vae=files["vae"])
    assert_same_pipeline(loaded, tiny("tiny-flux"))


def test_sd3_checkpoint_with_its_encoders_and_vae_inside(tiny, comfy_files, tmp_path, no_network):
    """Stability's sd3.5_*.safetensors: diffusion model, three encoders and the VAE in one file."""
    from safetensors.torch import load_file, save_file

    from core.checkpoints import load_pipeline
    from core.checkpoints.convert import STRUCTURE_KEY

    files = comfy_files("tiny-sd3")
    merged, structure = {}, {}
    from safetensors import safe_open

    def add(path, prefix):
        with safe_open(path, "pt") as handle:
            structure.update(__import__("json").loads(handle.metadata()[STRUCTURE_KEY]))
        merged.update({prefix + k: v for k, v in load_file(path).items()})

    add(files["base"], "model.diffusion_model.")
    add(files["vae"], "first_stage_model.")
    by_name = {p.rsplit("/", 1)[-1]: p for p in files["text_encoders"]}
    add(by_name["clip_l.safetensors"], "text_encoders.clip_l.transformer.")
    add(by_name["clip_g.safetensors"], "text_encoders.clip_g.transformer.")
    add(by_name["t5xxl.safetensors"], "text_encoders.t5xxl.transformer.")
    path = tmp_path / "sd3.5_tiny.safetensors"
    save_file(merged, str(path), metadata={STRUCTURE_KEY: __import__("json").dumps(structure)})
    assert_same_pipeline(load_pipeline(str(path)), tiny("tiny-sd3"))


@torch.no_grad()
def test_flux_saved_by_comfyui_with_weight_named_norms_loads_the_same(tiny, comfy_files, tmp_path, no_network):
    """ComfyUI 0.33 saves Flux's q/k RMSNorm gains as ``.weight`` where BFL's files say ``.scale``
    (a model its own classes built; found by tests/test_comfyui_dit.py's workflow test)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from core.checkpoints import load_pipeline

    files = comfy_files("tiny-flux")
    with safe_open(files["base"], "pt") as handle:
        metadata = handle.metadata()
    renamed = {k.removesuffix(".scale") + ".weight" if k.endswith("_norm.scale") else k: v
               for k, v in load_file(files["base"]).items()}
    assert any(k.endswith("query_norm.weight") for k in renamed)
    path = tmp_path / "flux_comfy_saved.safetensors"
    save_file(renamed, str(path), metadata=metadata)
    loaded = load_pipeline(str(path), text_encoders=files["text_encoders"], vae=files["vae"])
    assert_same_pipeline(loaded, tiny("tiny-flux"))


def test_flux_without_guidance_input_is_schnell(comfy_files, tmp_path, no_network):
    """No guidance_in: Flux.1-schnell's transformer config and fixed-shift (1) schedule."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from core.checkpoints import load_pipeline

    files = comfy_files("tiny-flux")
    with safe_open(files["base"], "pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("guidance_in.")}
        metadata = handle.metadata()
    path = tmp_path / "flux1-schnell.safetensors"
    save_file(state, str(path), metadata=metadata)
    pipe = load_pipeline(str(path), text_encoders=files["text_encoders"], vae=files["vae"])
    assert pipe.transformer.config.guidance_embeds is False
    assert pipe.scheduler.config.shift == 1.0 and pipe.scheduler.config.use_dynamic_shifting is False


# ---- refusals, before anything loads -----------------------------------------------------------
@pytest.fixture
def nothing_loads(monkeypatch):
    """Reading any tensor fails the test: refusals must come from the files' headers alone."""
    from core.checkpoints import components

    def refuse(path):
        raise AssertionError(f"tensors of {path} read before the refusal")

    monkeypatch.setattr(components, "read_file", refuse)
    import core.checkpoints.dit_files as dit_files

    monkeypatch.setattr(dit_files, "read_file", refuse)


def test_flux_without_text_encoders_or_vae_is_refused_naming_them(comfy_files, nothing_loads):
    from core.checkpoints import load_pipeline

    files = comfy_files("tiny-flux")
    with pytest.raises(ValueError) as err:
        load_pipeline(files["base"])
    message = str(err.value)
    for needed in ("Flux.1", "CLIP-L", "T5-XXL", "models/text_encoders", "--text-encoders", "ae.safetensors",
                   "models/vae", "--vae"):
        assert needed in message, (needed, message)
    # the VAE given, a T5 missing: only the T5 is named
    clip_l = next(p for p in files["text_encoders"] if p.endswith("clip_l.safetensors"))
    with pytest.raises(ValueError, match="T5-XXL") as err:
        load_pipeline(files["base"], text_encoders=[clip_l], vae=files["vae"])
    assert "CLIP-L (" not in str(err.value) and "--vae" not in str(err.value)


def test_sd3_without_t5_and_wrong_encoders_are_refused(comfy_files, nothing_loads):
    from core.checkpoints import load_pipeline

    sd3, zimage = comfy_files("tiny-sd3"), comfy_files("tiny-zimage")
    clips = [p for p in sd3["text_encoders"] if "clip" in p]
    with pytest.raises(ValueError, match="SD3.5 also needs its text encoder T5-XXL"):
        load_pipeline(sd3["base"], text_encoders=clips, vae=sd3["vae"])
    with pytest.raises(ValueError, match="Qwen3.*which SD3.5 does not use"):
        load_pipeline(sd3["base"], text_encoders=sd3["text_encoders"] + zimage["text_encoders"], vae=sd3["vae"])
    with pytest.raises(ValueError, match="both CLIP-L"):
        load_pipeline(sd3["base"], text_encoders=sd3["text_encoders"] + clips[-1:], vae=sd3["vae"])
    with pytest.raises(ValueError, match="not a VAE"):
        load_pipeline(sd3["base"], text_encoders=sd3["text_encoders"], vae=clips[0])
    with pytest.raises(ValueError, match="not a text encoder"):
        load_pipeline(sd3["base"], text_encoders=[sd3["vae"]], vae=sd3["vae"])
    with pytest.raises(ValueError, match="Z-Image also needs its text encoder Qwen3-4B"):
        load_pipeline(zimage["base"], vae=zimage["vae"])
    with pytest.raises(ValueError, match="--text-encoders / --vae go with"):
        load_pipeline("tiny-sdxl", vae=sd3["vae"])


def test_train_flags_are_checked_before_loading(tmp_path):
    from trainers.config import ConfigError, TrainConfig, validate

    cfg = TrainConfig(base="tiny-flux", data=str(tmp_path), text_encoders=[str(tmp_path / "t5.safetensors")],
                      vae=str(tmp_path / "ae.safetensors"))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "--text-encoders" in str(err.value) and "t5.safetensors" in str(err.value)
    assert "--vae" in str(err.value)


# ---- diffusers folders ---------------------------------------------------------------------------
@pytest.mark.parametrize("base", list(FAMILIES))
def test_diffusers_folder_loads(base, tiny, tmp_path, no_network):
    from core.checkpoints import load_pipeline

    tiny(base).save_pretrained(tmp_path)
    assert_same_pipeline(load_pipeline(str(tmp_path)), tiny(base))


# ---- real sizes: every parameter of the published architectures gets a tensor --------------------
def _meta(cls, **config):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):  # SD3.5 Medium's position table alone is 0.9 GB
        return cls(**config)


def _fingerprints(shapes: dict) -> dict:
    """One 1-D tensor per key, its first dimension's length, every value distinct across the file:
    the converters split and reorder along rows only, so equal outputs mean the same rows went to
    the same place."""
    out, offset = {}, 0
    for key, shape in sorted(shapes.items()):
        out[key] = torch.arange(offset, offset + shape[0], dtype=torch.float64)
        offset += shape[0]
    return out


def test_real_flux_dev_layout_converts_completely():
    """Flux.1-dev at full size (meta device): the config read from the BFL layout's shapes is the
    published one, every diffusers parameter gets a tensor of its shape, and each row lands where
    diffusers' own Flux converter (written for exactly this width) puts it."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from core.checkpoints.dit_convert import convert_flux, flux_config

    model = _meta(FluxTransformer2DModel, guidance_embeds=True)  # diffusers' defaults are Flux.1's widths
    bfl = flux_to_bfl(model.state_dict())
    shapes = {k: tuple(v.shape) for k, v in bfl.items()}
    config = flux_config(shapes)
    for key, value in config.items():
        assert tuple(model.config[key]) == tuple(value) if isinstance(value, list) else model.config[key] == value, key
    converted = convert_flux(bfl)
    expected = model.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    ours = convert_flux(_fingerprints(shapes))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(_fingerprints(shapes))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_real_sd35_medium_and_large_layouts_convert_completely():
    from diffusers import SD3Transformer2DModel

    from core.checkpoints.dit_convert import convert_sd3, sd3_config

    medium = dict(sample_size=128, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                  pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
    large = dict(sample_size=128, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                 pos_embed_max_size=192, qk_norm="rms_norm")
    for published in (medium, large):
        model = _meta(SD3Transformer2DModel, **published)
        mmdit = sd3_to_mmdit(model.state_dict())
        config = sd3_config({k: tuple(v.shape) for k, v in mmdit.items()})
        for key, value in config.items():
            assert (tuple(model.config[key]) if isinstance(value, tuple) else model.config[key]) == value, key
        converted, expected = convert_sd3(mmdit), model.state_dict()
        assert set(converted) == set(expected)
        assert all(converted[k].shape == expected[k].shape for k in expected)


def test_real_zimage_layout_converts_completely():
    from diffusers import ZImageTransformer2DModel

    from core.checkpoints.dit_convert import convert_zimage, zimage_config

    model = _meta(ZImageTransformer2DModel)  # diffusers' defaults are Z-Image's widths
    nextdit = zimage_to_nextdit(model.state_dict())
    config = zimage_config({k: tuple(v.shape) for k, v in nextdit.items()})
    for key in ("dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "cap_feat_dim", "in_channels"):
        assert model.config[key] == config[key], key
    converted, expected = convert_zimage(nextdit), model.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


# ---- real tokenizers from a ComfyUI tree (skipped without one) ------------------------------------
def test_t5_and_qwen_tokenizers_come_from_the_comfyui_tree(monkeypatch, tmp_path):
    from core.checkpoints.tokenizers import qwen_tokenizer, t5_tokenizer

    tree = comfyui_harness.comfyui_tree()
    if tree is None or not (tree / "comfy" / "text_encoders" / "t5_tokenizer").is_dir():
        pytest.skip("needs a ComfyUI tree (set COMFYUI_PATH)")
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="COMFYUI_PATH"):
        t5_tokenizer(32128, [tmp_path / "t5xxl.safetensors"])
    hint = [tree / "comfy" / "sd1_tokenizer"]  # the --tokenizer folder ComfyUI's node passes
    t5 = t5_tokenizer(32128, hint)
    assert t5("a photo").input_ids[-1] == t5.eos_token_id == 1
    qwen = qwen_tokenizer(151936, hint)
    text = qwen.apply_chat_template([{"role": "user", "content": "a photo"}], tokenize=False,
                                    add_generation_prompt=True, enable_thinking=True)
    # ComfyUI's Z-Image template (comfy/text_encoders/z_image.py): no system turn
    assert text == "<|im_start|>user\na photo<|im_end|>\n<|im_start|>assistant\n"
    assert qwen.pad_token_id == 151643


# ---- training from the files -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny-flux", "tiny-zimage"])
def test_train_runs_on_comfyui_files(base, comfy_files, region_dataset_64, tmp_path):
    from flow_helpers import fairhuman_args
    from train_helpers import train_cli

    files = comfy_files(base)
    args = fairhuman_args(base)
    args[args.index(base)] = files["base"]
    result = train_cli(*args, "--text-encoders", *files["text_encoders"], "--vae", files["vae"],
                       "--data", region_dataset_64, "--output", tmp_path, "--steps", 2, "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(tmp_path.glob("fairhuman_*.safetensors"))


@pytest.mark.slow
def test_sample_renders_from_comfyui_files(comfy_files, tmp_path):
    """``sample`` takes the same flags and renders through the loaded Flux pipeline."""
    from PIL import Image

    from train_helpers import run_trainers

    files = comfy_files("tiny-flux")
    result = run_trainers("sample", "--base", files["base"], "--text-encoders", *files["text_encoders"],
                          "--vae", files["vae"], "--prompt", "a photo of hands", "--steps", 2, "--size", 64,
                          "--output", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    images = list(tmp_path.glob("*.png"))
    assert images
    with Image.open(images[0]) as image:
        assert image.size == (64, 64)


def test_each_file_is_read_once_and_let_go_after_its_last_part(comfy_files, monkeypatch):
    """An SD3.5 checkpoint serves several parts from one read; a file no later part needs is not
    kept (Flux.1-dev's 24 GB of tensors are not held while T5-XXL loads)."""
    from core.checkpoints import dit_files

    reads = []
    real_read = dit_files.read_file
    monkeypatch.setattr(dit_files, "read_file", lambda path: reads.append(path) or real_read(path))
    files = comfy_files("tiny-flux")
    bundle, alone = dit_files.Part(Path(files["base"]), ""), dit_files.Part(Path(files["vae"]), "")
    cache = dit_files._Files([bundle, bundle, alone])
    cache.state(bundle)
    assert Path(files["base"]) in cache._cache  # a second part still needs it
    cache.state(bundle)
    cache.state(alone)
    assert reads == [Path(files["base"]), Path(files["vae"])] and cache._cache == {}


def test_aligned_tensors_in_their_dtype_are_adopted_not_copied():
    """A file read in its own dtype is not held twice (Flux.1-dev: 24 GB), yet a tensor at an
    unaligned address is still copied (CPU kernels drift by ~1e-7 there)."""
    from core.checkpoints.convert import _own

    storage = torch.zeros(1024, dtype=torch.bfloat16)
    aligned, unaligned = storage[:512], storage[1:513]
    assert aligned.data_ptr() % 64 == 0 and unaligned.data_ptr() % 64 != 0
    assert _own(aligned, torch.bfloat16).data_ptr() == aligned.data_ptr()
    copied = _own(unaligned, torch.bfloat16)
    assert copied.data_ptr() != unaligned.data_ptr() and copied.data_ptr() % 64 == 0
    assert torch.equal(copied, unaligned)
    assert _own(aligned, torch.float32).dtype == torch.float32  # a cast is a copy anyway


@pytest.mark.parametrize("command", ["sample", "build-pairs", "evaluate"])
def test_commands_refuse_an_incomplete_base_with_one_line(command, comfy_files, nothing_loads, tmp_path, capsys):
    """sample / build-pairs / evaluate on a Flux.1 file without its T5: one ``error:`` line naming
    what is missing, no traceback, nothing read."""
    from trainers.cli import main

    files = comfy_files("tiny-flux")
    clip_only = [p for p in files["text_encoders"] if "clip" in Path(p).name]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a person waving\n")
    extra = {"sample": ["--prompt", "a hand"], "build-pairs": ["--prompts", str(prompts)],
             "evaluate": ["--prompts", str(prompts), "--lora", f"{files['vae']}:x"]}[command]
    with pytest.raises(SystemExit) as exit_:
        main([command, "--base", files["base"], "--text-encoders", *clip_only, "--vae", files["vae"],
              "--output", str(tmp_path / "out"), *extra])
    assert str(exit_.value).startswith("error: ") and "T5-XXL" in str(exit_.value), exit_.value
