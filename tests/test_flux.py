"""FairHuman on a flow-matching transformer: the tiny Flux.1 model trained end to end, exact
resume, masks on the token grid, and the LoRA file's key format."""
from __future__ import annotations

import torch

from flow_helpers import (assert_diffusers_loader_reproduces, assert_lora_file_keys,
                          assert_mpd_training_lowers_all_three_losses, assert_one_pixel_face_owns_its_token,
                          fairhuman_args, train_lora_in_process)
from train_helpers import assert_killed_run_resumes_exactly, train_cli

COMMON = fairhuman_args("tiny-flux")
# The diffusers module paths of a Flux transformer that ComfyUI 0.33's Flux LoRA key map takes
# (comfy/utils.py flux_to_diffusers, prefixed "lora_transformer_" with dots as "_" in comfy/lora.py):
# the joint attention of the double-stream blocks, both streams, and the single blocks' q, k, v.
COMFYUI_FLUX_ATTENTION = {
    "transformer_blocks": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                           "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    "single_transformer_blocks": ("attn.to_q", "attn.to_k", "attn.to_v"),
}


def test_mpd_training_lowers_all_three_losses(region_dataset_64, tmp_path):
    assert_mpd_training_lowers_all_three_losses("tiny-flux", region_dataset_64, tmp_path)


def test_sigkill_then_resume_equals_uninterrupted(region_dataset_64, tmp_path):
    args = [*COMMON, "--batch-size", 2, "--steps", 12, "--checkpoint-every", 4, "--data", region_dataset_64]
    assert_killed_run_resumes_exactly(args, tmp_path, kill_at=8)



def test_sampling_during_training_is_refused_on_flux_not_rendered_wrong(region_dataset_64, tmp_path):
    """Rendering (--sample-every, --validate-every) is UNet-only so far: a Flux run that asks for
    it fails before its first step with a message saying what to set, never with wrong images."""
    result = train_cli(*COMMON, "--data", region_dataset_64, "--output", tmp_path, "--steps", 2, "--validate-every", 1)
    assert result.returncode == 1
    assert "cannot render flux images yet" in result.stdout + result.stderr
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "checkpoints").exists()


def test_one_pixel_face_owns_exactly_its_token_after_flip_and_crop(tmp_path):
    """The face loss's gradient reaches the transformer's output only at the token (2×2 latent
    cells, 16×16 pixels) holding the face pixel, and at all of that token's features: the mask
    is max-pooled to the token grid, through every crop and flip the data pipeline draws."""
    def packed_tokens(transformer):  # FluxTransformer2DModel returns its (B, tokens, 64) output
        outputs = []
        transformer.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
        return outputs

    assert_one_pixel_face_owns_its_token("tiny-flux", tmp_path / "data", packed_tokens)


def test_lora_keys_are_flux_keys_that_comfyui_and_diffusers_load(region_dataset_64, tmp_path):
    """Every key of the exported LoRA is a kohya-style ``lora_transformer_`` key of an attention
    projection ComfyUI's Flux map names, and diffusers' Flux loader, given the file, reproduces the
    trained transformer's output."""
    result = train_lora_in_process("tiny-flux", region_dataset_64, tmp_path)
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
