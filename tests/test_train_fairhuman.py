"""The FairHuman trainer end to end on the tiny models: learning, exact resume, export."""
import os

import pytest
import torch

from train_helpers import (assert_all_losses_fall, assert_killed_run_resumes_exactly, lora_tensors, make_region_dataset,
                           train_cli)
from core.fileio import read_events

pytestmark = pytest.mark.slow

COMMON = ["--method", "fairhuman", "--resolution", "128", "--rank", "8", "--lr", "1e-2",
          "--batch-size", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_region_dataset(tmp_path_factory.mktemp("regions"))


@pytest.mark.parametrize("base", ["tiny-sdxl", "tiny-sd15"])
def test_mpd_training_lowers_all_three_losses(dataset, tmp_path, base):
    result = train_cli(*COMMON, "--base", base, "--data", dataset, "--output", tmp_path, "--steps", 30,
                       "--weighting", "mpd", "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    progress = assert_all_losses_fall(tmp_path, 30, f"{base} ")
    weights = progress[-1]["weights"]
    assert len(weights) == 3 and all(w > 0 for w in weights)
    lora = tmp_path / f"fairhuman_{'sdxl' if base == 'tiny-sdxl' else 'sd15'}.safetensors"
    assert lora.is_file()
    assert all(k.startswith("lora_unet_") for k in lora_tensors(lora))


def test_sigkill_then_resume_equals_uninterrupted(dataset, tmp_path):
    # exactness does not depend on the size: 64 px, batch 2 (four steps left after the kill)
    args = [*COMMON, "--resolution", 64, "--batch-size", 2, "--steps", 12, "--checkpoint-every", 4,
            "--base", "tiny-sd15", "--data", dataset]
    assert_killed_run_resumes_exactly(args, tmp_path, kill_at=8)


def test_unannotated_folder_is_refused_before_anything_loads(tmp_path):
    (tmp_path / "photos").mkdir()
    result = train_cli("--method", "fairhuman", "--base", "tiny-sd15", "--data", tmp_path / "photos",
                       "--output", tmp_path / "run", "--steps", 1)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "annotate the folder first" in line
    assert not (tmp_path / "run").exists()
    missing = train_cli("--method", "fairhuman", "--data", tmp_path / "nope", "--output", tmp_path / "run")
    assert missing.returncode == 2 and "--data" in missing.stderr and "is not a folder" in missing.stderr


@pytest.mark.parametrize("base", ["tiny-sdxl", "tiny-sd15"])
def test_trained_lora_round_trips_through_diffusers(dataset, tmp_path, base):
    """The exported file, loaded by diffusers into a fresh pipeline, reproduces the trained
    UNet's output."""
    from core.lora_format import read_lora_metadata
    from core.tiny_models import build_tiny_pipeline
    from trainers.config import TrainConfig
    from trainers.train_job import run_job
    from core.fileio import EventLog

    cfg = TrainConfig(method="fairhuman", base=base, data=str(dataset), output=str(tmp_path), steps=3,
                      resolution=128, rank=8, alpha=4.0, lr=1e-2, batch_size=2, checkpoint_every=0)
    result = run_job(cfg, tmp_path, EventLog(tmp_path / "events.jsonl", echo=False), resume=False,
                     stop_requested=lambda: False, keep_model=True)
    trained = result["model"]
    trained.unet.eval()
    fresh = build_tiny_pipeline(base)
    fresh.load_lora_weights(result["lora"])

    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(1, 4, 16, 16, generator=generator)
    cond = trained.encode_prompts(["a photo of hands"])
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])
    t = torch.tensor([500])
    with torch.no_grad():
        expected = trained.predict(noisy, t, cond, time_ids)
        got = fresh.unet(noisy, t, encoder_hidden_states=cond.hidden,
                         added_cond_kwargs=trained.added_conditions(cond, time_ids)).sample
        base_out = build_tiny_pipeline(base).unet(
            noisy, t, encoder_hidden_states=cond.hidden,
            added_cond_kwargs=trained.added_conditions(cond, time_ids)).sample
    assert (got - expected).abs().max() <= 1e-4
    assert (base_out - expected).abs().max() > 1e-3  # the LoRA really changes the output
    meta = {k.removeprefix("fairhuman."): v for k, v in read_lora_metadata(result["lora"]).items()}
    assert meta["method"] == "fairhuman" and meta["rank"] == 8 and meta["steps"] == 3
    assert meta["base_arch"] == ("sdxl" if base == "tiny-sdxl" else "sd15")
    assert len(meta["final_weights"]) == 3 and meta["weighting"] == "mpd"
    assert meta["dataset_size"] == 4 and meta["objectives"] == ["global", "face", "hand"]


def test_validation_samples_and_clear_optimizer_errors(dataset, tmp_path):
    result = train_cli(*COMMON, "--base", "tiny-sd15", "--data", dataset, "--output", tmp_path / "a",
                       "--steps", 2, "--sample-every", 2, "--sample-prompts", "a photo of hands",
                       "--sample-steps", 2, "--checkpoint-every", 0)
    assert result.returncode == 0, result.stderr[-2000:]
    samples = [e for e in read_events(tmp_path / "a" / "events.jsonl") if e["event"] == "sample"]
    assert samples and all(os.path.isfile(p) for p in samples[0]["paths"])

    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except Exception:
        pass
    result = train_cli(*COMMON, "--base", "tiny-sd15", "--data", dataset, "--output", tmp_path / "b",
                       "--steps", 1, "--optimizer", "adamw8bit")
    assert result.returncode == 1
    error = read_events(tmp_path / "b" / "events.jsonl")[-1]
    assert error["event"] == "error" and "--optimizer adamw" in error["message"]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_checkpoints_train_offline(dataset, tmp_path, tiny_single_files, arch):
    """Original-layout single-file checkpoints (what ComfyUI users have) load and train with the
    hub unreachable (HF_HUB_OFFLINE and a dead proxy, see offline_env)."""
    result = train_cli(*COMMON, "--base", tiny_single_files[arch], "--data", dataset, "--output", tmp_path,
                       "--steps", 2, "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = read_events(tmp_path / "events.jsonl")
    assert meta[-1]["event"] == "done" and meta[-1]["lora"].endswith(f"fairhuman_{arch}.safetensors")


def test_latent_cache_gives_the_same_lora(dataset, tmp_path):
    args = [*COMMON, "--base", "tiny-sd15", "--data", dataset, "--steps", 3, "--checkpoint-every", 0,
            "--random-crop", "false"]
    assert train_cli(*args, "--output", tmp_path / "plain").returncode == 0
    cached = train_cli(*args, "--output", tmp_path / "cached", "--cache-latents", "true")
    assert cached.returncode == 0, cached.stderr[-2000:]
    assert len(list((tmp_path / "cached" / "cache" / "latents").glob("*.pt"))) >= 2
    a = lora_tensors(tmp_path / "plain" / "fairhuman_sd15.safetensors")
    b = lora_tensors(tmp_path / "cached" / "fairhuman_sd15.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    refused = train_cli(*COMMON, "--base", "tiny-sd15", "--data", dataset, "--steps", 1,
                        "--output", tmp_path / "refused", "--cache-latents", "true")
    assert refused.returncode == 1
    assert "--random-crop false" in read_events(tmp_path / "refused" / "events.jsonl")[-1]["message"]
