"""FairHuman on SD3.5: the tiny SD3.5-Medium-shaped model trained end to end, exact resume, masks
on the 2×2 patch grid, the LoRA file's keys, and conditioning as the pipeline samples with it."""
from __future__ import annotations

import pytest
import torch

from train_helpers import (assert_all_losses_fall, assert_killed_run_resumes_exactly,
                           assert_one_pixel_face_owns_its_patch, lora_tensors, make_region_dataset, train_cli)

# The two training runs take about 45 s and 40 s on two shared cores: marked slow; the rest
# (about 8 s) runs in every tier.

COMMON = ["--method", "fairhuman", "--base", "tiny-sd3", "--resolution", "64", "--rank", "8", "--lr", "1e-2",
          "--seed", "0"]
# The diffusers module paths of an SD3 transformer block that ComfyUI 0.33's SD3 LoRA key map takes
# (comfy/utils.py mmdit_to_diffusers, prefixed "lora_transformer_" with dots as "_" in comfy/lora.py):
# the joint attention's image stream (attn.to_q/k/v, attn.to_out.0), its text stream (add_*_proj,
# to_add_out) and MMDiT-X's second image attention (attn2), each where the block has it.
COMFYUI_SD3_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                         "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                         "attn2.to_out.0")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_region_dataset(tmp_path_factory.mktemp("regions"), size=64)


@pytest.mark.slow
def test_mpd_training_lowers_all_three_losses(dataset, tmp_path):
    result = train_cli(*COMMON, "--data", dataset, "--output", tmp_path, "--steps", 30, "--batch-size", 4,
                       "--weighting", "mpd", "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    progress = assert_all_losses_fall(tmp_path, 30, "tiny-sd3 ")
    assert all(w > 0 for w in progress[-1]["weights"])
    assert (tmp_path / "fairhuman_sd3.safetensors").is_file()


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(dataset, tmp_path):
    args = [*COMMON, "--batch-size", 2, "--steps", 12, "--checkpoint-every", 4, "--data", dataset]
    assert_killed_run_resumes_exactly(args, tmp_path, kill_at=8)


def test_sampling_during_training_is_refused_on_sd3(dataset, tmp_path):
    result = train_cli(*COMMON, "--data", dataset, "--output", tmp_path, "--steps", 2, "--sample-every", 1)
    assert result.returncode == 1
    assert "cannot render sd3 images yet" in result.stdout + result.stderr
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "checkpoints").exists()


def test_one_pixel_face_owns_exactly_its_patch_after_flip_and_crop(tmp_path):
    """SD3's transformer patchifies the latent itself: the face loss's gradient reaches its
    output (the latent grid) only at the 2×2 cells of the patch holding the face pixel, and at
    all 16 channels of those cells, through every crop and flip."""
    from core.families.flux import pack  # row-major 2×2 patches, checked against FluxPipeline's

    assert_one_pixel_face_owns_its_patch("tiny-sd3", tmp_path, tokens_of=pack)


def _merged_with(transformer, tensors, modules):
    """``transformer`` with each kohya LoRA pair of ``tensors`` merged as ComfyUI applies it
    (W += up @ down · alpha / rank) into the module its key names."""
    with torch.no_grad():
        for name, module in modules.items():
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            module.weight += up @ down * (float(tensors[f"{name}.alpha"]) / down.shape[0])
    return transformer


def test_lora_keys_are_the_sd3_keys_comfyui_maps(dataset, tmp_path):
    """The exported LoRA holds exactly one ``lora_transformer_`` key triple per attention
    projection of the tiny SD3.5 transformer that ComfyUI's SD3 map names (dual attention included,
    the last block's absent text-stream output excluded), each naming a module of the model; merged
    as ComfyUI merges it, the file reproduces the trained transformer's output."""
    from core.families import family_of
    from core.fileio import EventLog
    from core.lora_format import kohya_name, read_lora_metadata
    from core.tiny_models import build_tiny_pipeline
    from trainers.config import TrainConfig
    from trainers.train_job import run_job

    cfg = TrainConfig(method="fairhuman", base="tiny-sd3", data=str(dataset), output=str(tmp_path), steps=3,
                      resolution=64, rank=4, alpha=2.0, lr=1e-2, batch_size=2, checkpoint_every=0)
    result = run_job(cfg, tmp_path, EventLog(tmp_path / "events.jsonl", echo=False), resume=False,
                     stop_requested=lambda: False, keep_model=True)
    tensors = lora_tensors(result["lora"])
    fresh = build_tiny_pipeline("tiny-sd3")
    present = dict(fresh.transformer.named_modules())
    wanted = [f"transformer_blocks.{i}.{m}" for i in range(len(fresh.transformer.transformer_blocks))
              for m in COMFYUI_SD3_ATTENTION]
    expected = {kohya_name(m, "lora_transformer_"): present[m] for m in wanted if m in present}
    assert "lora_transformer_transformer_blocks_0_attn2_to_q" in expected  # MMDiT-X's dual attention
    assert "transformer_blocks.2.attn.to_add_out" not in present  # the last block's text stream ends early
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert names == set(expected)
    assert len(tensors) == 3 * len(expected)  # lora_down, lora_up and alpha of each
    assert all(float(tensors[f"{n}.alpha"]) == 2.0 for n in names)
    meta = read_lora_metadata(result["lora"])
    assert meta["fairhuman.base_arch"] == "sd3" and meta["ss_base_model_version"] == "sd3"

    trained = result["model"]
    trained.train(False)
    _merged_with(fresh.transformer, tensors, expected)
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    cond = trained.encode_prompts(["a photo of hands"])
    with torch.no_grad():
        expected_out = trained.predict(noisy, sigma, cond)
        got = family_of(fresh).predict(noisy, sigma, cond, None, None, None)
        base_out = family_of(build_tiny_pipeline("tiny-sd3")).predict(noisy, sigma, cond, None, None, None)
    assert (got - expected_out).abs().max() <= 1e-4
    assert (base_out - expected_out).abs().max() > 1e-3  # the LoRA really changes the output


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
