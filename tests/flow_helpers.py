"""What the flow-transformer tests (test_flux.py, test_zimage.py) share: the one-pixel face
dataset and the check that the face objective's gradient comes from exactly the token owning it."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

TOKEN_PIXELS = 16  # a token is a 2×2 patch of latent cells, 8×8 pixels each


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
