"""Fitting a GPU (docs/memory.md): the frozen denoiser stored in fp8 (``--base-weights fp8``), the
text encoders unloaded after every text is encoded (``--unload-text-encoders``), and gradient
checkpointing on the flow transformers. Each is measured against the run without it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flow_helpers import fairhuman_args
from train_helpers import assert_killed_run_resumes_exactly, lora_tensors

FP8_BASES = ["tiny-flux", "tiny-sd15"]
# the frozen denoiser's bytes with fp8 weights over those with bf16 ones: a transformer is nearly all
# linear layers (tiny-flux 0.63), a UNet's convolutions stay bf16 (tiny-sd15 0.83); docs/memory.md
FP8_STORAGE_SHARE = {"tiny-flux": 0.7, "tiny-sd15": 0.9}
# the first step's losses (before any update) of fp8 weights against bf16 ones, relative
FP8_LOSS_TOLERANCE = 0.02


def frozen_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.denoiser.named_parameters() if "lora_" not in n)


def bf16_model(base: str, **options):
    from core.tiny_models import build_tiny_pipeline
    from trainers.model import TrainableModel

    return TrainableModel(build_tiny_pipeline(base), rank=4, dtype=torch.bfloat16, gradient_checkpointing=True,
                          **options)


@pytest.mark.parametrize("base", FP8_BASES)
def test_fp8_base_weights_store_the_denoiser_in_about_half_the_bytes(base):
    """The linear layers' frozen weights take one byte each, half their bf16 bytes; norms, embeddings
    and convolutions keep bf16 (FP8_STORAGE_SHARE of the whole). The LoRA stays fp32 and trainable."""
    compute, fp8 = bf16_model(base), bf16_model(base, base_weights="fp8")
    stored = {n: p for n, p in fp8.denoiser.named_parameters() if "lora_" not in n}
    quantised = [n for n, p in stored.items() if p.dtype == torch.float8_e4m3fn]
    assert quantised and all(p.dtype in (torch.float8_e4m3fn, torch.bfloat16) for p in stored.values())
    assert not any("norm" in n for n in quantised)
    blocks = {f"{name}.weight" for name, m in fp8.denoiser.named_modules()  # the linear layers of the blocks
              if type(m) is torch.nn.Linear and "blocks." in name and "norm" not in name and "lora_" not in name}
    assert blocks and blocks <= set(quantised)
    before = dict(compute.denoiser.named_parameters())
    assert 2 * sum(stored[n].nbytes for n in quantised) == sum(before[n].nbytes for n in quantised)
    assert frozen_bytes(fp8) <= FP8_STORAGE_SHARE[base] * frozen_bytes(compute)
    lora = fp8.trainable.named_parameters()
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for _, p in lora)
    assert not any(p.requires_grad for p in stored.values())


def test_fp8_is_refused_where_it_cannot_help():
    """Without gradient checkpointing autograd would keep every layer's upcast weight (refused
    before anything loads, naming the fix), and a ControlNet is initialised from the weights."""
    from trainers.config import ConfigError, TrainConfig, validate

    with pytest.raises(ConfigError, match="--base-weights fp8 needs --gradient-checkpointing true"):
        validate(TrainConfig(base="tiny-flux", data=".", base_weights="fp8"))
    with pytest.raises(ConfigError, match="a controlnet is initialised from"):
        validate(TrainConfig(method="fairhuman-controlnet", base="tiny-sd15", data=".", base_weights="fp8",
                             gradient_checkpointing=True))
    validate(TrainConfig(base="tiny-flux", data=".", base_weights="fp8", gradient_checkpointing=True))


def fp8_args(base, dataset, *extra):
    return [*fairhuman_args(base), "--data", dataset, "--mixed-precision", "bf16", "--gradient-checkpointing", "true",
            "--batch-size", 2, "--checkpoint-every", 2, *extra]


def run_in_process(folder, resume: bool = False, stop_requested=lambda: False, **options) -> dict:
    """``run_job`` of a FairHuman LoRA (rank 4, 64², lr 1e-2, batch 2), the trained model kept."""
    from core.fileio import EventLog
    from trainers.config import TrainConfig
    from trainers.train_job import run_job

    cfg = TrainConfig(**{**dict(method="fairhuman", output=str(folder), steps=4, resolution=64, rank=4, lr=1e-2,
                                batch_size=2, checkpoint_every=0), **options})
    return run_job(cfg, folder, EventLog(folder / "events.jsonl", echo=False), resume=resume,
                   stop_requested=stop_requested, keep_model=True)


def progress_losses(folder) -> list[dict]:
    from core.fileio import read_events

    return [e["losses"] for e in read_events(folder / "events.jsonl") if e["event"] == "progress"]


def assert_file_holds_the_trained_lora(result: dict, base: str) -> None:
    """diffusers' loader, given the exported file, makes a fresh fp32 pipeline predict what an fp32
    model holding the trained LoRA tensors predicts (the file is the fp32 LoRA, not a quantised one)."""
    from core.families import family_of
    from core.tiny_models import build_tiny_pipeline
    from trainers.model import TrainableModel
    from trainers.trainables import Trainable

    trained = result["model"].trainable
    plain = TrainableModel(build_tiny_pipeline(base), rank=trained.rank, alpha=trained.alpha)
    plain.trainable.load_state_dict(trained.state_dict())
    plain.train(False)
    fresh = build_tiny_pipeline(base)
    fresh.load_lora_weights(result["lora"])
    channels = fresh.vae.config.latent_channels
    noisy = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    t = plain.family.probe_timesteps(2)[1:]
    cond = plain.encode_prompts(["a photo of hands"])
    with torch.no_grad():
        expected = plain.predict(noisy, t, cond)
        got = family_of(fresh).predict(noisy, t, cond, None, Trainable(), None)  # no ControlNet
        with plain.reference():
            base_out = plain.predict(noisy, t, cond)
    assert (got - expected).abs().max() <= 1e-4
    assert (base_out - expected).abs().max() > 1e-3  # the LoRA really changes the output


@pytest.mark.slow
@pytest.mark.parametrize("base", FP8_BASES)
def test_fp8_training_tracks_bf16_and_exports_the_fp32_lora(base, region_dataset_64, tmp_path):
    """Four bf16 steps with fp8 base weights against the same run with bf16 weights (same batches,
    noise and LoRA init): finite losses, the first step's (before any update) within 2%, and the
    exported file is the trained fp32 LoRA, read back by diffusers."""
    common = dict(base=base, data=str(region_dataset_64), mixed_precision="bf16", gradient_checkpointing=True)
    losses, results = {}, {}
    for weights in ("compute", "fp8"):
        results[weights] = run_in_process(tmp_path / weights, base_weights=weights, **common)
        losses[weights] = progress_losses(tmp_path / weights)
    assert len(losses["fp8"]) == 4
    assert all(np.isfinite(list(step.values())).all() for step in losses["fp8"])
    for name, value in losses["fp8"][0].items():
        reference = losses["compute"][0][name]
        assert abs(value - reference) <= FP8_LOSS_TOLERANCE * abs(reference), (name, value, reference)
    assert losses["fp8"][0] != losses["compute"][0]  # the weights really are quantised
    assert all(p.dtype == torch.float32 for p in results["fp8"]["model"].trainable.parameters())
    assert_file_holds_the_trained_lora(results["fp8"], base)


@pytest.mark.slow
def test_fp8_killed_run_resumes_exactly(region_dataset_64, tmp_path):
    args = fp8_args("tiny-flux", region_dataset_64, "--steps", 4, "--base-weights", "fp8")
    assert_killed_run_resumes_exactly(args, tmp_path, kill_at=2)


# ---- text encoders unloaded after encoding ---------------------------------------------------------
@pytest.mark.parametrize("base", ["tiny-sdxl", "tiny-flux"])
def test_unloaded_text_encoders_are_gone_and_the_texts_read_from_the_cache(base, tmp_path):
    """After set-up the pipeline holds no text encoder and nothing else does (their memory is
    freed); the listed texts condition exactly as encoded with the encoders, from the run's disk
    cache, and an unlisted one is refused with a message naming the option."""
    import gc
    import weakref

    from core.tiny_models import build_tiny_pipeline
    from trainers.cache import TensorCache
    from trainers.model import TEXT_ENCODERS, TrainableModel

    keep = TrainableModel(build_tiny_pipeline(base), rank=4)
    pipe = build_tiny_pipeline(base)
    encoders = [weakref.ref(getattr(pipe, n)) for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None]
    assert len(encoders) == 2
    texts = ["a photo of hands", "a person waving"]
    model = TrainableModel(pipe, rank=4, texts=texts, text_cache=TensorCache(tmp_path / "text"))
    gc.collect()
    assert all(getattr(pipe, n, None) is None for n in TEXT_ENCODERS)
    assert all(ref() is None for ref in encoders)
    assert len(list((tmp_path / "text").glob("*.pt"))) == len(texts)
    got, expected = model.conditioning(texts[::-1]), keep.conditioning(texts[::-1])
    assert torch.equal(got.hidden, expected.hidden) and torch.equal(got.pooled, expected.pooled)
    with pytest.raises(ValueError, match="was not encoded before the text encoders were unloaded"):
        model.conditioning(["a cat"])


@pytest.mark.parametrize("base", ["tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3", "tiny-zimage"])
def test_renders_from_embeddings_equal_renders_from_text(base, tmp_path):
    """With the encoders unloaded, sample and validation images are rendered from the prompt's
    embeddings (and the empty negative prompt's, where the pipeline's guidance uses one): the
    same image as the pipeline encoding the prompt itself."""
    from core.tiny_models import build_tiny_pipeline
    from trainers.cache import TensorCache
    from trainers.config import TrainConfig
    from trainers.model import TrainableModel
    from trainers.train_job import make_renderer

    cfg = TrainConfig(base=base, sample_every=1, sample_steps=2, resolution=64)
    prompt = "a photo of hands"
    images = []
    for texts in (None, [prompt, ""]):
        cache = TensorCache(tmp_path / "text") if texts else None
        model = TrainableModel(build_tiny_pipeline(base), rank=4, texts=texts, text_cache=cache)
        images.append(np.asarray(make_renderer(cfg, model)([(prompt, 0)])[0]))
    assert model.pipe.text_encoder is None
    assert images[0].std() > 1 and np.array_equal(images[0], images[1])


def stop_after(steps: int):
    calls = iter(range(10**6))
    return lambda: next(calls) + 1 >= steps


@pytest.mark.slow
def test_unloaded_encoders_train_bit_for_bit_and_resume_without_encoders(region_dataset_64, tmp_path, monkeypatch):
    """FairHuman on tiny-flux with samples every 2 steps: the losses and the sample images equal a
    run that keeps its text encoders (same seed, bit for bit on one thread); a run cancelled at
    step 2 resumes with no way to encode text (reading the run's cache) to the same LoRA."""
    from PIL import Image

    from core.families.flux import FluxFamily

    common = dict(base="tiny-flux", data=str(region_dataset_64), sample_every=2, sample_prompts=["a photo of hands"],
                  sample_steps=2, checkpoint_every=2)
    run_in_process(tmp_path / "keep", **common)
    run_in_process(tmp_path / "unload", unload_text_encoders=True, **common)
    assert progress_losses(tmp_path / "unload") == progress_losses(tmp_path / "keep")
    for path in sorted((tmp_path / "keep" / "samples").glob("*.png")):
        with Image.open(path) as a, Image.open(tmp_path / "unload" / "samples" / path.name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), path.name

    cancelled = run_in_process(tmp_path / "resumed", unload_text_encoders=True, stop_requested=stop_after(2), **common)
    assert cancelled["status"] == "cancelled"

    def no_text_encoder(self, prompts, dtype):
        raise AssertionError(f"a resumed run encoded {prompts}")

    monkeypatch.setattr(FluxFamily, "encode_prompts", no_text_encoder)
    resumed = run_in_process(tmp_path / "resumed", unload_text_encoders=True, resume=True, **common)
    assert resumed["status"] == "done"
    straight, again = lora_tensors(tmp_path / "unload" / "fairhuman_flux.safetensors"), lora_tensors(resumed["lora"])
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)


# ---- gradient checkpointing on the flow families ----------------------------------------------------
def test_gradient_checkpointing_leaves_a_flux_step_unchanged(region_dataset_64, tmp_path):
    """One FairHuman step of the training loop on tiny-flux (MPD over the three objectives' LoRA
    gradients): the losses and every LoRA gradient are the same with the transformer's blocks
    checkpointed (recomputed in the backward pass) as without."""
    from core.fileio import EventLog
    from core.tiny_models import build_tiny_pipeline
    from trainers.config import TrainConfig
    from trainers.loop import TrainingLoop
    from trainers.methods.fairhuman import FairHuman
    from trainers.model import TrainableModel

    steps = {}
    for checkpointing in (False, True):
        cfg = TrainConfig(base="tiny-flux", data=str(region_dataset_64), output=str(tmp_path), resolution=64, rank=4,
                          batch_size=2, steps=1, gradient_checkpointing=checkpointing)
        model = TrainableModel(build_tiny_pipeline("tiny-flux"), rank=4, gradient_checkpointing=checkpointing)
        assert model.denoiser.is_gradient_checkpointing == checkpointing
        loop = TrainingLoop(cfg, FairHuman(cfg, model), tmp_path, EventLog(tmp_path / "events.jsonl", echo=False))
        result = loop.step(0)
        steps[checkpointing] = (result.losses, [p.grad.clone() for p in loop.params])
    (losses, grads), (losses_ckpt, grads_ckpt) = steps[False], steps[True]
    assert torch.equal(losses, losses_ckpt)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ckpt))


def test_fp8_stores_flux_dev_in_under_two_thirds_of_its_bf16_bytes():
    """Flux.1-dev's transformer (its published configuration, built on the meta device: no weights)
    under the same storage policy: 11.9 B parameters, 22.2 GiB in bf16, 14.1 GiB with fp8 base
    weights (the norms' modulation linears, 3.2 B parameters, keep bf16)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from trainers.precision import Precision

    with init_empty_weights():
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
    transformer.to(torch.bfloat16)
    bf16 = sum(p.nbytes for p in transformer.parameters())
    Precision(torch.bfloat16, "cpu", "fp8").store(transformer)
    fp8 = sum(p.nbytes for p in transformer.parameters())
    assert 11.8e9 < bf16 / 2 < 12e9
    assert fp8 / bf16 < 0.65 and fp8 < 15 * 2**30
