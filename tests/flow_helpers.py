"""What the flow-transformer tests (test_flux.py, test_sd3.py, test_zimage.py, test_flow_dpo.py)
share: the one-pixel face dataset and the check that the face objective's gradient comes from
exactly the token owning it, LoRA files trained and read back, and rendering checked against the
family's own pipeline."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

TOKEN_PIXELS = 16  # a token is a 2×2 patch of latent cells, 8×8 pixels each
RENDER = dict(num_inference_steps=3, height=64, width=48)  # a small render, not square (catches swapped sides)


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


def assert_one_pixel_face_owns_its_token(base: str, folder, token_outputs) -> None:
    """Train-step losses of ``base`` on a one-pixel face, over eight epochs of random crops and
    flips: the face loss's gradient with respect to the transformer's per-token output (B, tokens,
    features), which ``token_outputs(denoiser)`` collects into the list it returns, is nonzero at
    exactly the token (16×16 pixels, row-major over the 64² crop) holding the pixel, and at all of
    that token's features."""
    from core.tiny_models import build_tiny_pipeline
    from trainers.config import TrainConfig
    from trainers.data import collate
    from trainers.methods.fairhuman import FairHuman
    from trainers.model import TrainableModel

    y, x = 21, 37  # inside every 64-wide crop of the 80-wide image (left offset 0..16)
    cfg = TrainConfig(data=str(one_pixel_face_dataset(folder, (y, x))), resolution=64, bucketing=False,
                      random_crop=True, flip_p=0.5, batch_size=1, rank=4)
    model = TrainableModel(build_tiny_pipeline(base), rank=4)
    method = FairHuman(cfg, model)
    outputs = token_outputs(model.denoiser)
    per_row = 64 // TOKEN_PIXELS
    seen = set()
    for epoch in range(8):
        batch = collate([method.dataset.item(0, epoch)])
        top, left = (int(v) for v in batch["time_ids"][0, 2:4])
        flipped = batch["view"][0].endswith("flip")
        col = x - left
        col = 63 - col if flipped else col
        token = ((y - top) // TOKEN_PIXELS) * per_row + col // TOKEN_PIXELS
        outputs.clear()
        losses = method.losses(batch, torch.Generator().manual_seed(epoch)).losses
        (grad,) = torch.autograd.grad(losses[1], outputs[0])
        owned = grad[0].ne(0)
        assert owned.any(dim=1).nonzero().flatten().tolist() == [token], (epoch, top, left, flipped)
        assert owned[token].all(), "every latent cell of the face's token counts"
        seen.add((left, flipped))
    assert {f for _, f in seen} == {True, False} and len({left for left, _ in seen}) > 1


def train_lora_in_process(base: str, dataset, folder) -> dict:
    """A three-step FairHuman LoRA (rank 4, alpha 2) on ``base``: ``run_job``'s result, the trained
    model kept."""
    from core.fileio import EventLog
    from trainers.config import TrainConfig
    from trainers.train_job import run_job

    cfg = TrainConfig(method="fairhuman", base=base, data=str(dataset), output=str(folder), steps=3,
                      resolution=64, rank=4, alpha=2.0, lr=1e-2, batch_size=2, checkpoint_every=0)
    return run_job(cfg, folder, EventLog(folder / "events.jsonl", echo=False), resume=False,
                   stop_requested=lambda: False, keep_model=True)


def lora_module_names(tensors: dict) -> set[str]:
    """The module names of a LoRA file's keys (``<name>.lora_down.weight``, ``.lora_up.weight``,
    ``.alpha``)."""
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}


def assert_lora_file_keys(path, expected: set, arch: str, kohya_version: str) -> None:
    """A train_lora_in_process LoRA file holds a lora_down, a lora_up and an alpha of 2 for exactly
    the module names ``expected``, and names its base ``arch`` (this pack's metadata) and
    ``kohya_version`` (kohya's ss_base_model_version)."""
    from safetensors.torch import load_file

    from core.lora_format import read_lora_metadata

    tensors = load_file(str(path))
    names = lora_module_names(tensors)
    assert names == expected
    assert len(tensors) == 3 * len(expected)  # lora_down, lora_up and alpha of each
    assert all(float(tensors[f"{n}.alpha"]) == 2.0 for n in names)
    meta = read_lora_metadata(path)
    assert meta["fairhuman.base_arch"] == arch and meta["ss_base_model_version"] == kohya_version


def assert_diffusers_loader_reproduces(result: dict, base: str, load=None) -> None:
    """diffusers' own ``load_lora_weights`` (or ``load(pipe, path)`` where diffusers reads no such
    file: SD3's kohya keys), given the trained LoRA file, makes a fresh ``base`` pipeline predict
    what the trained model predicts, and that differs from the base model's."""
    from core.families import family_of
    from core.tiny_models import build_tiny_pipeline

    trained = result["model"]
    trained.train(False)
    fresh = build_tiny_pipeline(base)
    if load is None:
        fresh.load_lora_weights(result["lora"])
    else:
        load(fresh, result["lora"])
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    cond = trained.encode_prompts(["a photo of hands"])
    with torch.no_grad():
        expected = trained.predict(noisy, sigma, cond)
        got = family_of(fresh).predict(noisy, sigma, cond, None, None, None)
        base_out = family_of(build_tiny_pipeline(base)).predict(noisy, sigma, cond, None, None, None)
    assert (got - expected).abs().max() <= 1e-4
    assert (base_out - expected).abs().max() > 1e-3  # the LoRA really changes the output


def fairhuman_args(base: str) -> list:
    """The ``train`` arguments the flow-transformer tests share: FairHuman at 64², rank 8, lr 1e-2."""
    return ["--method", "fairhuman", "--base", base, "--resolution", "64", "--rank", "8", "--lr", "1e-2",
            "--seed", "0"]


def assert_mpd_training_lowers_all_three_losses(base: str, dataset, folder) -> None:
    """30 MPD steps of ``train`` on ``base`` (batch 4): each loss falls (assert_all_losses_fall),
    every weight stays positive, and the LoRA file is named after the family."""
    from train_helpers import assert_all_losses_fall, train_cli

    result = train_cli(*fairhuman_args(base), "--data", dataset, "--output", folder, "--steps", 30, "--batch-size", 4,
                       "--weighting", "mpd", "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    progress = assert_all_losses_fall(folder, 30, f"{base} ")
    assert all(w > 0 for w in progress[-1]["weights"])
    assert (folder / f"fairhuman_{base.removeprefix('tiny-')}.safetensors").is_file()  # tiny-flux: fairhuman_flux


def assert_render_under_autocast_is_the_pipelines(base: str, **kwargs):
    """(family, image): the mixed-precision rendering path (denoise under autocast, then the
    family's own grid, unscale, unshift and fp32 decode) gives the pipeline's own image when the
    autocast is a no-op, at RENDER's size."""
    import contextlib

    from core.families import family_of
    from core.tiny_models import build_tiny_pipeline

    family = family_of(build_tiny_pipeline(base))
    plain = family.render("a person", torch.Generator().manual_seed(3), **RENDER, **kwargs)[0]
    decoded = family.render("a person", torch.Generator().manual_seed(3), autocast=contextlib.nullcontext(),
                            **RENDER, **kwargs)[0]
    assert plain.size == (RENDER["width"], RENDER["height"])
    assert np.array_equal(np.asarray(plain), np.asarray(decoded))
    assert np.asarray(plain).std() > 1
    return family, plain


def assert_one_guided_step_is_classifier_free(base: str, cfg: float) -> None:
    """One sampling step from σ to 0 rendered with the pack's ``cfg`` and a negative prompt equals
    the Euler step x_t − σ·v of the classifier-free velocity v = v(neg) + cfg·(v(prompt) − v(neg)),
    the velocities read off the transformer through the family's ``predict`` (its own sign) with
    the prompts conditioned as in training. cfg 1 is the prompt's velocity alone."""
    from core.families import family_of
    from core.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline(base)
    family = family_of(pipe)
    prompt, negative = "a photo of a person waving hands", "blurry"
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    stepped = family.render(prompt, torch.Generator().manual_seed(0), cfg=cfg, negative=negative, height=64, width=64,
                            latents=noisy.clone(), sigmas=[0.7], output_type="latent")
    sigma = pipe.scheduler.sigmas[:1]  # 0.7 after the scheduler's shift
    assert float(sigma) > 0.7
    with torch.no_grad():
        pos, neg = (family.predict(noisy, sigma, family.encode_prompts([text], torch.float32), None, None, None)
                    for text in (prompt, negative))
    x0 = family.predicted_x0_and_eps(noisy, sigma, neg + cfg * (pos - neg))[0]
    assert (stepped - x0).abs().max() <= 1e-5
