"""FairHuman on SD3.5, what is SD3.5's own: masks on the 2×2 patch grid, the LoRA file's keys and
reading it back, conditioning as the pipeline samples with it, and rendering as the pipeline does
(training, exact resume, rendering during training and with the LoRA: test_flow_training.py)."""
from __future__ import annotations

import pytest
import torch

from flow_helpers import (RENDER, assert_diffusers_loader_reproduces, assert_lora_file_keys,
                          assert_one_guided_step_is_classifier_free, assert_one_pixel_face_owns_its_token,
                          assert_render_under_autocast_is_the_pipelines, lora_module_names, train_lora_in_process)
from train_helpers import lora_tensors

# The diffusers module paths of an SD3 transformer block that ComfyUI 0.33's SD3 LoRA key map takes
# (comfy/utils.py mmdit_to_diffusers, prefixed "lora_transformer_" with dots as "_" in comfy/lora.py):
# the joint attention's image stream (attn.to_q/k/v, attn.to_out.0), its text stream (add_*_proj,
# to_add_out) and MMDiT-X's second image attention (attn2), each where the block has it.
COMFYUI_SD3_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                         "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                         "attn2.to_out.0")


def test_one_pixel_face_owns_exactly_its_patch_after_flip_and_crop(tmp_path):
    """SD3's transformer patchifies the latent itself: the face loss's gradient reaches its
    output (the latent grid) only at the 2×2 cells of the patch holding the face pixel, and at
    all 16 channels of those cells, through every crop and flip."""
    from core.families.flux import pack, unpack  # row-major 2×2 patches, checked against FluxPipeline's

    def patch_tokens(transformer):
        """SD3Transformer2DModel returns the latent grid (B, 16, h, w): the hook hands back the
        same output rebuilt from its patches, so the loss is a function of the collected tokens."""
        outputs = []

        def as_tokens(module, args, out):
            tokens = pack(out[0])
            outputs.append(tokens)
            return (unpack(tokens, *out[0].shape[-2:]), *out[1:])

        transformer.register_forward_hook(as_tokens)
        return outputs

    assert_one_pixel_face_owns_its_token("tiny-sd3", tmp_path / "data", patch_tokens)


def merge_as_comfyui(pipe, path):
    """Each kohya LoRA pair of the file merged into the transformer module its key names, as
    ComfyUI applies it: W += up @ down · alpha / rank. A key naming no module fails here."""
    from core.lora_format import kohya_name

    tensors = lora_tensors(path)
    modules = {kohya_name(n, "lora_transformer_"): m for n, m in pipe.transformer.named_modules()}
    with torch.no_grad():
        for name in lora_module_names(tensors):
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            modules[name].weight += up @ down * (float(tensors[f"{name}.alpha"]) / down.shape[0])


def test_lora_keys_are_the_sd3_keys_comfyui_maps(region_dataset_64, tmp_path):
    """The exported LoRA holds exactly one ``lora_transformer_`` key triple per attention
    projection of the tiny SD3.5 transformer that ComfyUI's SD3 map names (dual attention included,
    the last block's absent text-stream output excluded), each naming a module of the model; merged
    as ComfyUI merges it, and read back by the family (through diffusers' SD3 loader, which takes
    no kohya keys and no alphas), the file reproduces the trained transformer's output."""
    from core.families import family_of

    from core.lora_format import kohya_name, load_into_pipeline

    result = train_lora_in_process("tiny-sd3", region_dataset_64, tmp_path)
    transformer = result["model"].denoiser
    present = {name for name, _ in transformer.named_modules()}
    wanted = [f"transformer_blocks.{i}.{m}" for i in range(len(transformer.transformer_blocks))
              for m in COMFYUI_SD3_ATTENTION]
    expected = {kohya_name(m, "lora_transformer_") for m in wanted if m in present}
    assert "lora_transformer_transformer_blocks_0_attn2_to_q" in expected  # MMDiT-X's dual attention
    assert "transformer_blocks.2.attn.to_add_out" not in present  # the last block's text stream ends early
    assert_lora_file_keys(result["lora"], expected, "sd3", "sd3")
    assert_diffusers_loader_reproduces(result, "tiny-sd3", load=merge_as_comfyui)
    assert_diffusers_loader_reproduces(result, "tiny-sd3",
                                       load=lambda pipe, path: load_into_pipeline(family_of(pipe), path, "l"))


def test_conditioning_and_timestep_are_the_pipelines():
    """Training conditions the transformer as StableDiffusion3Pipeline samples with it: the
    prompt embeddings (CLIP-L ⊕ CLIP-G padded to T5's width, then T5's tokens) and the pooled
    projection equal ``encode_prompt``'s, and the denoiser gets t = σ·1000 as the sampling loop
    gives it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from core.families import family_of
    from core.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-sd3")
    family = family_of(pipe)
    prompts = ["a photo of a person waving hands", "two friends smiling"]
    cond = family.encode_prompts(prompts, torch.float32)
    with torch.no_grad():  # as the pipeline's __call__ runs it
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=pipe.tokenizer_3.model_max_length)
    assert torch.equal(cond.hidden, hidden) and torch.equal(cond.pooled, pooled)
    clip_l, clip_g = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert cond.hidden.shape == (2, 77 + pipe.tokenizer_3.model_max_length, pipe.text_encoder_3.config.d_model)
    assert cond.pooled.shape == (2, pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim)
    assert cond.hidden[:, :77, clip_l + clip_g:].eq(0).all()  # CLIP zero-padded to T5's width

    # the sampler's t for a σ on its schedule, and what the family passes the transformer for that σ
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["timestep"]),
                                               with_kwargs=True)
    with torch.no_grad():
        family.predict(torch.randn(1, 16, 8, 8), scheduler.sigmas[1:2], cond.repeat(1), None, None, None)
    assert torch.allclose(seen[0], scheduler.timesteps[1:2])


def test_timesteps_follow_the_sd35_shifted_logit_normal():
    """σ is the logit-normal draw diffusers' SD3 trainer makes (the same standard-normal draws
    through compute_density_for_timestep_sampling), shifted as SD3.5's scheduler shifts its
    schedule (shift 3, its own sigmas on the full grid); noisy and target are the flow's."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from core.families import family_of
    from core.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-sd3")
    family = family_of(pipe)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    steps = scheduler.config.num_train_timesteps
    grid = torch.arange(steps, 0, -1, dtype=torch.float32) / steps  # the unshifted training sigmas
    assert torch.allclose(family.shift(grid, tokens=16), scheduler.sigmas[:steps])

    latents = torch.randn(64, 16, 8, 8)
    _, sigmas = family.sample_noise_and_timesteps(latents, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    torch.randn(latents.shape, generator=generator)  # the noise is drawn first
    u = compute_density_for_timestep_sampling("logit_normal", 64, logit_mean=0.0, logit_std=1.0,
                                              generator=generator)
    assert not torch.allclose(u, sigmas)
    assert torch.allclose(sigmas, family.shift(u, tokens=16))
    noise = torch.randn_like(latents)
    s = sigmas.view(-1, 1, 1, 1)
    assert torch.allclose(family.add_noise(latents, noise, sigmas), (1 - s) * latents + s * noise)
    assert torch.equal(family.target(latents, noise, sigmas), noise - latents)


def test_render_decodes_as_the_pipeline_with_t5_as_long_as_trained():
    """The mixed-precision path decodes as StableDiffusion3Pipeline does (SD3's scaling and shift
    factors), with a negative prompt and guidance; the T5 encoder reads as many tokens when
    rendering as in training (the pipeline's default, 256, would pad the tokenizer's 32 further)."""
    family, _ = assert_render_under_autocast_is_the_pipelines("tiny-sd3", cfg=3.0, negative="blurry")
    lengths = []
    family.pipe.text_encoder_3.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    family.render("a person", torch.Generator().manual_seed(0), cfg=3.0, **{**RENDER, "num_inference_steps": 1})
    assert lengths == [family.max_sequence_length] * 2 and family.max_sequence_length < 256  # prompt, negative


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_one_guided_step_is_classifier_free_guidance(cfg):
    assert_one_guided_step_is_classifier_free("tiny-sd3", cfg)
