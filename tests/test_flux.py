"""FairHuman on a flow-matching transformer: the tiny Flux.1 model trained end to end, exact
resume, masks on the token grid, and the LoRA file's key format."""
from __future__ import annotations

import pytest
import torch

from train_helpers import (assert_killed_run_resumes_exactly, assert_lora_file_keys,
                           assert_lora_file_reproduces_training, assert_mpd_run_lowers_all_three_losses,
                           assert_one_pixel_face_owns_its_patch, assert_rendering_refused, make_region_dataset,
                           short_lora_run)

# Not marked slow: the whole file takes about 30 s on two cores, so CI runs it.

COMMON = ["--method", "fairhuman", "--base", "tiny-flux", "--resolution", "64", "--rank", "8", "--lr", "1e-2",
          "--seed", "0"]
# The diffusers module paths of a Flux transformer that ComfyUI 0.33's Flux LoRA key map takes
# (comfy/utils.py flux_to_diffusers, prefixed "lora_transformer_" with dots as "_" in comfy/lora.py):
# the joint attention of the double-stream blocks, both streams, and the single blocks' q, k, v.
COMFYUI_FLUX_ATTENTION = {
    "transformer_blocks": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                           "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    "single_transformer_blocks": ("attn.to_q", "attn.to_k", "attn.to_v"),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_region_dataset(tmp_path_factory.mktemp("regions"), size=64)


def test_mpd_training_lowers_all_three_losses(dataset, tmp_path):
    assert_mpd_run_lowers_all_three_losses([*COMMON, "--data", dataset], tmp_path, "tiny-flux ")
    assert (tmp_path / "fairhuman_flux.safetensors").is_file()


def test_sigkill_then_resume_equals_uninterrupted(dataset, tmp_path):
    args = [*COMMON, "--batch-size", 2, "--steps", 12, "--checkpoint-every", 4, "--data", dataset]
    assert_killed_run_resumes_exactly(args, tmp_path, kill_at=8)


def test_sampling_during_training_is_refused_on_flux_not_rendered_wrong(dataset, tmp_path):
    """Rendering (--sample-every, --validate-every) is UNet-only so far: a Flux run that asks for
    it fails before its first step with a message saying what to set, never with wrong images."""
    assert_rendering_refused([*COMMON, "--data", dataset], tmp_path, "flux", "--validate-every")


def test_one_pixel_face_owns_exactly_its_token_after_flip_and_crop(tmp_path):
    """The face loss's gradient reaches the transformer's output only at the token (2×2 latent
    cells, 16×16 pixels) holding the face pixel, and at all of that token's features: the mask
    is max-pooled to the token grid, through every crop and flip the data pipeline draws."""
    assert_one_pixel_face_owns_its_patch("tiny-flux", tmp_path, tokens_of=lambda out: out)


def test_lora_keys_are_flux_keys_that_comfyui_and_diffusers_load(dataset, tmp_path):
    """Every key of the exported LoRA is a kohya-style ``lora_transformer_`` key of an attention
    projection ComfyUI's Flux map names, and diffusers' Flux loader, given the file, reproduces the
    trained transformer's output."""
    result = short_lora_run("tiny-flux", dataset, tmp_path)
    expected = {f"lora_transformer_{block}_{i}_{module}".replace(".", "_")
                for block, modules in COMFYUI_FLUX_ATTENTION.items() for i in range(2) for module in modules}
    assert_lora_file_keys(result["lora"], expected, "flux", "flux1")
    assert_lora_file_reproduces_training(result, "tiny-flux", lambda pipe, path: pipe.load_lora_weights(path))


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
