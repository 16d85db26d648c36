"""HG-DPO and Fair DPO on the flow families (tiny-flux, tiny-sd3, tiny-zimage): the Diffusion-DPO
and statistic-matching losses equal a hand computation from velocity errors, and build-pairs then
hg-dpo / fair-dpo run end to end on each."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.fileio import read_events
from train_helpers import lora_tensors, make_pairs_folder, run_trainers, train_cli

PROMPTS = ["a photo of a woman waving hands", "two friends holding hands", "a portrait of a smiling man"]
FLOW_BASES = ["tiny-flux", "tiny-sd3", "tiny-zimage"]


# Each transformer called as its pipeline calls it, written out here rather than through the family:
# its output on the (B, 16, h, w) latent grid for latents x at σ.
def flux_output(transformer, x, sigma, cond, guidance=3.5):
    """FluxPipeline: its own packing and RoPE positions, σ as the timestep, distilled guidance."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    out = transformer(
        hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=sigma,
        guidance=torch.full((b,), guidance), pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden,
        txt_ids=torch.zeros(cond.hidden.shape[1], 3), return_dict=False,
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
    )[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def sd3_output(transformer, x, sigma, cond):
    """StableDiffusion3Pipeline: the latent grid itself, t = σ·1000."""
    return transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond.hidden,
                       pooled_projections=cond.pooled, return_dict=False)[0]


def zimage_output(transformer, x, sigma, cond):
    """ZImagePipeline: a list of (C, 1, h, w) frames, the time 1 − σ, each caption's real tokens."""
    captions = [hidden[mask] for hidden, mask in zip(cond.hidden, cond.mask)] if cond.mask is not None \
        else list(cond.hidden)
    out = transformer(list(x.unsqueeze(2).unbind(0)), 1 - sigma, captions, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


# base: (the transformer's output, the sign of that output against the velocity noise − x0)
TRANSFORMERS = {"tiny-flux": (flux_output, 1), "tiny-sd3": (sd3_output, 1), "tiny-zimage": (zimage_output, -1)}


@pytest.mark.parametrize("base", FLOW_BASES)
def test_dpo_and_stat_losses_equal_a_hand_computation_from_velocity_errors(base, tmp_path):
    """For a fixed batch (2 pairs; winner and loser share noise and σ) the method's losses equal
    Diffusion-DPO's formula on the tuned and reference errors against the family's own target,
    ‖out − sign·(noise − x0)‖² (Z-Image's transformer predicts x0 − noise: sign −1), and the
    statistic loss the squared difference of the channel means of x0 = x_t − σ·v (v = sign·out,
    the velocity noise − x0) of the two models, averaged over the 16 channels."""
    from core.tiny_models import build_tiny_pipeline
    from trainers.config import TrainConfig
    from trainers.methods.hg_dpo import HGDPO
    from trainers.model import TrainableModel

    output, sign = TRANSFORMERS[base]
    model = TrainableModel(build_tiny_pipeline(base), rank=4)
    with torch.no_grad():  # a LoRA that moves the model (its B starts at 0: tuned = reference)
        generator = torch.Generator().manual_seed(1)
        for name, p in model.trainable.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    cfg = TrainConfig(method="hg-dpo", base=base, data=str(make_pairs_folder(tmp_path / "pairs", size=32)),
                      resolution=32, rank=4)
    method = HGDPO(cfg, model)

    g = torch.Generator().manual_seed(0)
    n = 2
    x0 = torch.randn(2 * n, 16, 4, 4, generator=g)  # winners then losers
    noise = torch.randn(n, 16, 4, 4, generator=g).repeat(2, 1, 1, 1)
    sigma = torch.tensor([0.3, 0.8]).repeat(2)
    noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    target = sign * (noise - x0)
    assert torch.equal(model.add_noise(x0, noise, sigma), noisy) and torch.equal(model.target(x0, noise, sigma), target)
    cond = model.conditioning(PROMPTS[:n] * 2)

    transformer = model.denoiser
    model.train(False)
    with torch.no_grad():
        tuned = output(transformer, noisy, sigma, cond)
        transformer.disable_adapters()
        reference = output(transformer, noisy, sigma, cond)
        transformer.enable_adapters()
    err, ref_err = ((tuned - target) ** 2).mean((1, 2, 3)), ((reference - target) ** 2).mean((1, 2, 3))
    delta = (err[:n] - err[n:]) - (ref_err[:n] - ref_err[n:])
    assert delta.abs().min() > 0  # the LoRA changes the errors: the DPO term is not log 2
    method.beta = 2.0 / float(delta.abs().mean())  # β/2·|Δ| near 1: the loss is far from saturating
    expected_dpo = -F.logsigmoid(-0.5 * method.beta * delta).mean()
    channel_means = lambda out: (noisy[:n] - sigma[:n].view(-1, 1, 1, 1) * sign * out[:n]).mean((2, 3))  # noqa: E731
    expected_stat = ((channel_means(tuned) - channel_means(reference)) ** 2).mean()

    losses = method.objectives(noisy, sigma, target, cond, None, n, {}).losses.detach()
    assert abs(float(losses[0]) - float(expected_dpo)) <= 1e-6
    assert abs(float(expected_dpo) - 0.6931) > 0.01
    assert float(expected_stat) > 0
    assert abs(float(losses[1]) - float(expected_stat)) <= 1e-6 * float(expected_stat)


@pytest.fixture(scope="module", params=FLOW_BASES)
def flow_pairs(request, tmp_path_factory):
    """(base, folder): build-pairs on a tiny flow model: 3 prompts × 3 images of 32² pixels, 2
    flow-matching steps."""
    base = request.param
    folder = tmp_path_factory.mktemp(f"{base}_pairs")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS))
    result = run_trainers("build-pairs", "--base", base, "--prompts", folder / "prompts.txt", "--n", 3,
                          "--output", folder, "--steps", 2, "--size", 32, "--mask-confidence", 0.1,
                          env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base, folder


@pytest.mark.slow
def test_build_pairs_writes_pairs_of_its_images(flow_pairs):
    from PIL import Image

    from trainers.methods.hg_dpo import read_pair_records

    _, folder = flow_pairs
    records = read_pair_records(folder / "pairs.jsonl")
    assert list(records) == PROMPTS
    ok = [r for r in records.values() if r["status"] == "ok"]
    assert ok, records
    for record in ok:
        assert len(record["images"]) == 3 and record["winner_score"] > record["loser_score"]
        with Image.open(folder / record["winner"]) as image:
            assert image.size == (32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hg-dpo", "fair-dpo"])
def test_dpo_methods_train_a_lora_on_built_pairs(flow_pairs, tmp_path, method):
    from core.families import LORA_PREFIXES

    base, folder = flow_pairs
    arch = base.removeprefix("tiny-")
    result = train_cli("--method", method, "--base", base, "--data", folder, "--output", tmp_path,
                       "--steps", 3, "--resolution", 32, "--rank", 4, "--checkpoint-every", 0, "--eval-every", 3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = read_events(tmp_path / "events.jsonl")
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) == 3 and all(0 < e["dpo_loss"] < 1 for e in progress)
    assert any(e["event"] == "eval" and "pair_margin" in e for e in events)
    lora = tmp_path / f"{method.replace('-', '')}_{arch}.safetensors"
    tensors = lora_tensors(lora)
    assert tensors and all(k.startswith(LORA_PREFIXES[arch]) for k in tensors)
    assert any(k.endswith("lora_up.weight") and tensors[k].abs().max() > 0 for k in tensors)  # it trained


@pytest.mark.parametrize("base", FLOW_BASES)
def test_build_pairs_refuses_a_ddpm_sampler_on_a_flow_model(base, tmp_path):
    """DPM-Solver++ is built from a DDPM scheduler config: on a flow-matching schedule it is
    refused with the flag to use, not run on a schedule it cannot read."""
    (tmp_path / "prompts.txt").write_text(PROMPTS[0])
    result = run_trainers("build-pairs", "--base", base, "--prompts", tmp_path / "prompts.txt", "--n", 2,
                          "--output", tmp_path / "out", "--steps", 1, "--size", 32, "--sampler", "dpmsolver++")
    assert result.returncode != 0 and "use --sampler default" in result.stderr
