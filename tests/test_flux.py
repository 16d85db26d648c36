"""FairHuman on Flux.1, what is Flux's own: rendering during training, masks on the token grid,
the LoRA file's keys and reading it back, packing and RoPE positions (training and exact resume:
test_flow_training.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flow_helpers import (assert_diffusers_loader_reproduces, assert_lora_file_keys,
                          assert_one_pixel_face_owns_its_token, fairhuman_args, train_lora_in_process)
from train_helpers import train_cli

# Rendering during training and reading the LoRA back through `sample` are slow (they train and
# sample); the rest runs in CI's tier.
COMMON = fairhuman_args("tiny-flux")
# The diffusers module paths of a Flux transformer that ComfyUI 0.33's Flux LoRA key map takes
# (comfy/utils.py flux_to_diffusers, prefixed "lora_transformer_" with dots as "_" in comfy/lora.py):
# the joint attention of the double-stream blocks, both streams, and the single blocks' q, k, v.
COMFYUI_FLUX_ATTENTION = {
    "transformer_blocks": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                           "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    "single_transformer_blocks": ("attn.to_q", "attn.to_k", "attn.to_v"),
}


@pytest.mark.slow
def test_sampling_and_validation_during_training_render_flux_images(region_dataset_64, tmp_path):
    """--sample-every and --validate-every render through the Flux family's pipeline: the sample
    and validation images exist, are of the training size, and are not flat (packed latents decoded
    with the wrong layout or without the shift factor would still be images; the equality with
    FluxPipeline's own decoding is ``test_render_under_autocast_decodes_as_flux_pipeline``)."""
    from core.fileio import read_events

    result = train_cli(*COMMON, "--data", region_dataset_64, "--output", tmp_path, "--steps", 2, "--sample-every", 2,
                       "--sample-prompts", "a photo of hands", "--sample-steps", 2, "--validate-every", 2,
                       "--validation-prompts", "a person waving", "--validation-seeds", 1, "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = read_events(tmp_path / "events.jsonl")
    paths = [p for e in events if e["event"] in ("sample", "validation") for p in e["paths"]]
    assert len(paths) == 2 and {e["event"] for e in events} >= {"sample", "validation"}
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (64, 64) and np.asarray(image).std() > 1
    assert (tmp_path / "fairhuman_flux_best.safetensors").is_file()


def test_render_under_autocast_decodes_as_flux_pipeline():
    """The mixed-precision rendering path (denoise under autocast, then unpack, unscale, unshift
    and decode in fp32 itself) gives FluxPipeline's own image when the autocast is a no-op, and
    sampling takes the dev transformer's distilled guidance 3.5 (the guidance it trains with)."""
    import contextlib

    from core.families import family_of
    from core.families.flux import TRAIN_GUIDANCE
    from core.tiny_models import build_tiny_pipeline

    family = family_of(build_tiny_pipeline("tiny-flux"))
    common = dict(num_inference_steps=3, height=64, width=48)
    plain = family.render("a person", torch.Generator().manual_seed(3), **common)[0]
    decoded = family.render("a person", torch.Generator().manual_seed(3), autocast=contextlib.nullcontext(),
                            **common)[0]
    assert plain.size == (48, 64) and np.array_equal(np.asarray(plain), np.asarray(decoded))
    assert family.guidance_kwargs(7.0)["guidance_scale"] == TRAIN_GUIDANCE
    other = family.render("a person", torch.Generator().manual_seed(3), guidance_scale=1.0, **common)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(other))  # the guidance is an input



def test_one_pixel_face_owns_exactly_its_token_after_flip_and_crop(tmp_path):
    """The face loss's gradient reaches the transformer's output only at the token (2×2 latent
    cells, 16×16 pixels) holding the face pixel, and at all of that token's features: the mask
    is max-pooled to the token grid, through every crop and flip the data pipeline draws."""
    def packed_tokens(transformer):  # FluxTransformer2DModel returns its (B, tokens, 64) output
        outputs = []
        transformer.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
        return outputs

    assert_one_pixel_face_owns_its_token("tiny-flux", tmp_path / "data", packed_tokens)


@pytest.fixture(scope="module")
def trained(region_dataset_64, tmp_path_factory):
    """A FairHuman LoRA trained 3 steps on tiny-flux, with the trained model kept."""
    return train_lora_in_process("tiny-flux", region_dataset_64, tmp_path_factory.mktemp("flux_lora"))


def test_lora_keys_are_flux_keys_that_comfyui_and_diffusers_load(trained):
    """Every key of the exported LoRA is a kohya-style ``lora_transformer_`` key of an attention
    projection ComfyUI's Flux map names, and diffusers' Flux loader, given the file, reproduces the
    trained transformer's output."""
    result = trained
    expected = {f"lora_transformer_{block}_{i}_{module}".replace(".", "_")
                for block, modules in COMFYUI_FLUX_ATTENTION.items() for i in range(2) for module in modules}
    assert_lora_file_keys(result["lora"], expected, "flux", "flux1")
    assert_diffusers_loader_reproduces(result, "tiny-flux")


def test_tokens_and_positions_are_the_flux_pipelines():
    """Training packs latents and numbers tokens exactly as FluxPipeline samples them, so a LoRA
    trained here sees at inference the token layout it was trained on."""
    from diffusers import FluxPipeline

    from core.families.flux import image_ids, pack, unpack

    latents = torch.randn(2, 16, 6, 10)
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack(packed, 6, 10), latents)
    reference = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 10, "cpu", torch.float32), reference.reshape(-1, 3)[: 3 * 5])


@pytest.mark.slow
def test_sample_reads_a_flux_lora_back_and_refuses_a_unet_one(trained, tmp_path):
    """``sample --lora`` on the Flux base loads the trained file (the images change with it) and
    refuses a UNet LoRA, with or without metadata, naming both architectures; the pack's own
    reader maps the file's keys back onto the transformer's modules with the trained tensors."""
    from safetensors.torch import save_file

    from core.lora_format import kohya_to_peft_state, load_lora_state
    from core.tiny_models import build_tiny_pipeline
    from train_helpers import run_trainers

    common = ["sample", "--base", "tiny-flux", "--prompt", "a photo of hands", "--steps", 2, "--size", 64]
    plain = run_trainers(*common, "--output", tmp_path / "plain")
    tuned = run_trainers(*common, "--lora", trained["lora"], "--lan", "--output", tmp_path / "lora")
    assert plain.returncode == 0 and tuned.returncode == 0, plain.stderr[-2000:] + tuned.stderr[-2000:]
    without = np.asarray(Image.open(tmp_path / "plain" / "000_seed0.png"), dtype=int)
    lan = np.asarray(Image.open(tmp_path / "lora" / "000_seed0_lan.png"), dtype=int)
    assert np.abs(without - lan).max() > 0  # LAN matches statistics, not images: the LoRA shows

    unet_lora = tmp_path / "unet_lora.safetensors"  # another trainer's: no metadata, lora_unet_ keys
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(unet_lora))
    refused = run_trainers(*common, "--lora", unet_lora, "--output", tmp_path / "bad")
    assert refused.returncode != 0
    assert "is a LoRA for sd15/sdxl" in refused.stderr and "is flux" in refused.stderr

    state, alphas = kohya_to_peft_state(load_lora_state(trained["lora"]))  # dots restored by name rules
    modules = dict(build_tiny_pipeline("tiny-flux").transformer.named_modules())
    assert set(alphas) <= set(modules) and set(alphas.values()) == {2.0}
    trained_layers = {n: p for n, p in trained["model"].denoiser.named_parameters() if "lora_" in n}
    for name, tensor in state.items():
        module, ab = name.rsplit(".lora_", 1)
        assert torch.equal(tensor, trained_layers[f"{module}.lora_{ab[0]}.default.weight"])
