"""FairHuman on Flux.1, what is Flux's own: decoding as FluxPipeline does, masks on the token grid,
the LoRA file's keys and reading it back, packing and RoPE positions (training, exact resume and
rendering during training and with the LoRA: test_flow_training.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flow_helpers import (RENDER, assert_diffusers_loader_reproduces, assert_lora_file_keys,
                          assert_one_pixel_face_owns_its_token, assert_render_under_autocast_is_the_pipelines,
                          train_lora_in_process)

# The diffusers module paths of a Flux transformer that ComfyUI 0.33's Flux LoRA key map takes
# (comfy/utils.py flux_to_diffusers, prefixed "lora_transformer_" with dots as "_" in comfy/lora.py):
# the joint attention of the double-stream blocks, both streams, and the single blocks' q, k, v.
COMFYUI_FLUX_ATTENTION = {
    "transformer_blocks": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                           "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    "single_transformer_blocks": ("attn.to_q", "attn.to_k", "attn.to_v"),
}


def test_render_under_autocast_decodes_as_flux_pipeline():
    """The mixed-precision rendering path (denoise under autocast, then unpack, unscale, unshift
    and decode in fp32 itself) gives FluxPipeline's own image when the autocast is a no-op, and
    sampling takes the dev transformer's distilled guidance 3.5 (the guidance it trains with)."""
    from core.families.flux import TRAIN_GUIDANCE

    family, plain = assert_render_under_autocast_is_the_pipelines("tiny-flux")
    assert family.guidance_kwargs(7.0)["guidance_scale"] == TRAIN_GUIDANCE
    other = family.render("a person", torch.Generator().manual_seed(3), guidance_scale=1.0, **RENDER)[0]
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


def test_the_packs_reader_maps_flux_keys_back_to_the_trained_modules(trained):
    """The pack's reader maps the file's keys back onto the transformer's modules by its naming
    rules alone (no module list) with the trained tensors. (``sample --lora`` reading the file
    back: test_flow_training.py.)"""
    from core.lora_format import kohya_to_peft_state, load_lora_state
    from core.tiny_models import build_tiny_pipeline

    state, alphas = kohya_to_peft_state(load_lora_state(trained["lora"]))  # dots restored by name rules
    modules = dict(build_tiny_pipeline("tiny-flux").transformer.named_modules())
    assert set(alphas) <= set(modules) and set(alphas.values()) == {2.0}
    trained_layers = {n: p for n, p in trained["model"].denoiser.named_parameters() if "lora_" in n}
    for name, tensor in state.items():
        module, ab = name.rsplit(".lora_", 1)
        assert torch.equal(tensor, trained_layers[f"{module}.lora_{ab[0]}.default.weight"])
