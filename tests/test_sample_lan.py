"""The diffusers LAN counterpart: same statistics property as the node, and the CLI."""
import pytest
import torch

from core.lan import channel_stats
from train_helpers import run_trainers


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_sd15):
    from peft import LoraConfig

    from core.lora_format import save_lora
    from core.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-sd15")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("lora") / "hgdpo_sd15.safetensors"
    save_lora(path, pipe.unet, metadata={"method": "hg-dpo", "base_arch": "sd15"})
    return path


def test_lan_matches_reference_stats_at_every_step(lora_file):
    from core.tiny_models import build_tiny_pipeline
    from trainers.sample import lan_generate

    pipe = build_tiny_pipeline("tiny-sd15")
    pipe.load_lora_weights(str(lora_file), adapter_name="lora")
    _, recorder, tuned = lan_generate(pipe, "a photo of hands", seed=3, strength=1.0, num_inference_steps=6,
                                      height=64, width=64, guidance_scale=5.0)
    assert len(tuned) == len(recorder.stats) == 6
    for (mean, std), (ref_mean, ref_std) in zip(tuned, recorder.stats):
        assert torch.allclose(mean, ref_mean, atol=1e-4) and torch.allclose(std, ref_std, atol=1e-4)
    # the LoRA moves the un-normalized trajectory away from the reference: the check is not vacuous
    pipe.enable_lora()
    free = []
    pipe("a photo of hands", generator=torch.Generator().manual_seed(3), num_inference_steps=6, height=64,
         width=64, guidance_scale=5.0, output_type="latent",
         callback_on_step_end=lambda p, s, t, k: free.append(channel_stats(k["latents"])) or k)
    assert not torch.allclose(free[-1][1], recorder.stats[-1][1], atol=1e-3)


def test_sample_cli_writes_images(lora_file, tmp_path):
    result = run_trainers("sample", "--base", "tiny-sd15", "--prompt", "two hands", "--lora", lora_file, "--lan",
                          "--steps", 3, "--size", 64, "--output", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.glob("*_lan.png"))) == 1
    bad = run_trainers("sample", "--base", "tiny-sd15", "--prompt", "x", "--lan", "--output", tmp_path)
    assert bad.returncode != 0 and "--lan needs --lora" in bad.stderr
