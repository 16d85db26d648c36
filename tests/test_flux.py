"""FairHuman on a flow-matching transformer: the tiny Flux.1 model trained end to end, exact
resume, masks on the token grid, and the LoRA file's key format."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from train_helpers import (assert_all_losses_fall, assert_killed_run_resumes_exactly, lora_tensors, make_region_dataset,
                           train_cli)

# Not marked slow: the whole file takes about 50 s on two cores, so CI runs it.

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



def test_sampling_and_validation_during_training_render_flux_images(dataset, tmp_path):
    """--sample-every and --validate-every render through the Flux family's pipeline: the sample
    and validation images exist, are of the training size, and are not flat (packed latents decoded
    with the wrong layout or without the shift factor would still be images; the equality with
    FluxPipeline's own decoding is ``test_render_under_autocast_decodes_as_flux_pipeline``)."""
    from core.fileio import read_events

    result = train_cli(*COMMON, "--data", dataset, "--output", tmp_path, "--steps", 2, "--sample-every", 2,
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


def one_pixel_face_dataset(folder, pixel_yx):
    """One 80×64 image (wider than the 64² crop, so random crops move it; never resized) whose
    face mask is the single pixel ``pixel_yx``."""
    folder.mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / "img.png")
    face = np.zeros((64, 80), np.uint8)
    face[pixel_yx] = 255
    Image.fromarray(face).save(folder / "masks" / "img_face.png")
    Image.fromarray(np.zeros_like(face)).save(folder / "masks" / "img_hand.png")
    row = {"image": "img.png", "text": "a photo of a person", "width": 80, "height": 64,
           "mask_face": "masks/img_face.png", "mask_hand": "masks/img_hand.png", "status": "ok"}
    (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    return folder


def test_one_pixel_face_owns_exactly_its_token_after_flip_and_crop(tmp_path):
    """The face loss's gradient reaches the transformer's output only at the token (2×2 latent
    cells, 16×16 pixels) holding the face pixel, and at all of that token's features: the mask
    is max-pooled to the token grid, through every crop and flip the data pipeline draws."""
    from core.tiny_models import build_tiny_pipeline
    from trainers.config import TrainConfig
    from trainers.data import collate
    from trainers.methods.fairhuman import FairHuman
    from trainers.model import TrainableModel

    y, x = 21, 37  # inside every 64-wide crop of the 80-wide image (left offset 0..16)
    cfg = TrainConfig(data=str(one_pixel_face_dataset(tmp_path / "data", (y, x))), resolution=64, bucketing=False,
                      random_crop=True, flip_p=0.5, batch_size=1, rank=4)
    model = TrainableModel(build_tiny_pipeline("tiny-flux"), rank=4)
    method = FairHuman(cfg, model)
    outputs = []
    model.denoiser.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    seen = set()
    for epoch in range(8):
        batch = collate([method.dataset.item(0, epoch)])
        top, left = (int(v) for v in batch["time_ids"][0, 2:4])
        flipped = batch["view"][0].endswith("flip")
        col = x - left
        col = 63 - col if flipped else col
        token = ((y - top) // 16) * 4 + col // 16  # 4×4 tokens of 16×16 pixels, row-major
        outputs.clear()
        losses = method.losses(batch, torch.Generator().manual_seed(epoch)).losses
        tokens = outputs[0]  # (1, 16 tokens, 64 features)
        (grad,) = torch.autograd.grad(losses[1], tokens)
        owned = grad[0].ne(0)
        assert owned.any(dim=1).nonzero().flatten().tolist() == [token], (epoch, top, left, flipped)
        assert owned[token].all(), "every latent cell of the face's token counts"
        seen.add((left, flipped))
    assert {f for _, f in seen} == {True, False} and len({left for left, _ in seen}) > 1


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A FairHuman LoRA trained 3 steps on tiny-flux, with the trained model kept."""
    from core.fileio import EventLog
    from trainers.config import TrainConfig
    from trainers.train_job import run_job

    out = tmp_path_factory.mktemp("flux_lora")
    cfg = TrainConfig(method="fairhuman", base="tiny-flux", data=str(dataset), output=str(out), steps=3,
                      resolution=64, rank=4, alpha=2.0, lr=1e-2, batch_size=2, checkpoint_every=0)
    return run_job(cfg, out, EventLog(out / "events.jsonl", echo=False), resume=False,
                   stop_requested=lambda: False, keep_model=True)


def test_lora_keys_are_flux_keys_that_comfyui_and_diffusers_load(trained):
    """Every key of the exported LoRA is a kohya-style ``lora_transformer_`` key of an attention
    projection ComfyUI's Flux map names, and diffusers' Flux loader, given the file, reproduces the
    trained transformer's output."""
    from core.families import family_of
    from core.lora_format import read_lora_metadata
    from core.tiny_models import build_tiny_pipeline

    result = trained
    tensors = lora_tensors(result["lora"])
    expected = {f"lora_transformer_{block}_{i}_{module}".replace(".", "_")
                for block, modules in COMFYUI_FLUX_ATTENTION.items() for i in range(2) for module in modules}
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert names == expected
    assert len(tensors) == 3 * len(expected)  # lora_down, lora_up and alpha of each
    assert all(float(tensors[f"{n}.alpha"]) == 2.0 for n in names)
    meta = read_lora_metadata(result["lora"])
    assert meta["fairhuman.base_arch"] == "flux" and meta["ss_base_model_version"] == "flux1"

    model = result["model"]
    model.train(False)
    fresh = build_tiny_pipeline("tiny-flux")
    fresh.load_lora_weights(result["lora"])
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    cond = model.encode_prompts(["a photo of hands"])
    with torch.no_grad():
        expected_out = model.predict(noisy, sigma, cond)
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
