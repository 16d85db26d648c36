"""FairHuman on a flow-matching transformer: the tiny Flux.1 model trained end to end, exact
resume, masks on the token grid, and the LoRA file's key format."""
from __future__ import annotations

import pytest
import torch

from train_helpers import (assert_all_losses_fall, assert_killed_run_resumes_exactly,
                           assert_one_pixel_face_owns_its_patch, lora_tensors, make_region_dataset, train_cli)

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
    result = train_cli(*COMMON, "--data", dataset, "--output", tmp_path, "--steps", 30, "--batch-size", 4,
                       "--weighting", "mpd", "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    progress = assert_all_losses_fall(tmp_path, 30, "tiny-flux ")
    assert all(w > 0 for w in progress[-1]["weights"])
    assert (tmp_path / "fairhuman_flux.safetensors").is_file()


def test_sigkill_then_resume_equals_uninterrupted(dataset, tmp_path):
    args = [*COMMON, "--batch-size", 2, "--steps", 12, "--checkpoint-every", 4, "--data", dataset]
    assert_killed_run_resumes_exactly(args, tmp_path, kill_at=8)



def test_sampling_during_training_is_refused_on_flux_not_rendered_wrong(dataset, tmp_path):
    """Rendering (--sample-every, --validate-every) is UNet-only so far: a Flux run that asks for
    it fails before its first step with a message saying what to set, never with wrong images."""
    result = train_cli(*COMMON, "--data", dataset, "--output", tmp_path, "--steps", 2, "--validate-every", 1)
    assert result.returncode == 1
    assert "cannot render flux images yet" in result.stdout + result.stderr
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "checkpoints").exists()

def test_one_pixel_face_owns_exactly_its_token_after_flip_and_crop(tmp_path):
    """The face loss's gradient reaches the transformer's output only at the token (2×2 latent
    cells, 16×16 pixels) holding the face pixel, and at all of that token's features: the mask
    is max-pooled to the token grid, through every crop and flip the data pipeline draws."""
    assert_one_pixel_face_owns_its_patch("tiny-flux", tmp_path, tokens_of=lambda out: out)


def test_lora_keys_are_flux_keys_that_comfyui_and_diffusers_load(dataset, tmp_path):
    """Every key of the exported LoRA is a kohya-style ``lora_transformer_`` key of an attention
    projection ComfyUI's Flux map names, and diffusers' Flux loader, given the file, reproduces the
    trained transformer's output."""
    from core.families import family_of
    from core.fileio import EventLog
    from core.lora_format import read_lora_metadata
    from core.tiny_models import build_tiny_pipeline
    from trainers.config import TrainConfig
    from trainers.train_job import run_job

    cfg = TrainConfig(method="fairhuman", base="tiny-flux", data=str(dataset), output=str(tmp_path), steps=3,
                      resolution=64, rank=4, alpha=2.0, lr=1e-2, batch_size=2, checkpoint_every=0)
    result = run_job(cfg, tmp_path, EventLog(tmp_path / "events.jsonl", echo=False), resume=False,
                     stop_requested=lambda: False, keep_model=True)
    tensors = lora_tensors(result["lora"])
    expected = {f"lora_transformer_{block}_{i}_{module}".replace(".", "_")
                for block, modules in COMFYUI_FLUX_ATTENTION.items() for i in range(2) for module in modules}
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert names == expected
    assert len(tensors) == 3 * len(expected)  # lora_down, lora_up and alpha of each
    assert all(float(tensors[f"{n}.alpha"]) == 2.0 for n in names)
    meta = read_lora_metadata(result["lora"])
    assert meta["fairhuman.base_arch"] == "flux" and meta["ss_base_model_version"] == "flux1"

    trained = result["model"]
    trained.train(False)
    fresh = build_tiny_pipeline("tiny-flux")
    fresh.load_lora_weights(result["lora"])
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    cond = trained.encode_prompts(["a photo of hands"])
    with torch.no_grad():
        expected_out = trained.predict(noisy, sigma, cond)
        got = family_of(fresh).predict(noisy, sigma, cond, None, None, None)
        base_out = family_of(build_tiny_pipeline("tiny-flux")).predict(noisy, sigma, cond, None, None, None)
    assert (got - expected_out).abs().max() <= 1e-4
    assert (base_out - expected_out).abs().max() > 1e-3  # the LoRA really changes the output


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
