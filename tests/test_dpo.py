"""Diffusion-DPO and statistic-matching losses: hand-computed values and their behaviour."""
import math

import pytest
import torch

from core.dpo import ddpm_posterior_mean, diffusion_dpo_loss, per_sample_error, stat_matching_loss


def test_dpo_loss_equals_hand_computed_values():
    mw, ml = torch.tensor([0.30, 0.50]), torch.tensor([0.40, 0.45])
    rw, rl = torch.tensor([0.35, 0.50]), torch.tensor([0.35, 0.50])
    beta = 10.0
    loss, metrics = diffusion_dpo_loss(mw, ml, rw, rl, beta)
    # pair 1: Δ = (0.30-0.40) - 0 = -0.10, inside = +0.5;  pair 2: Δ = 0.05 - 0 = 0.05, inside = -0.25
    expected = (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(0.25)))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["reward_margin"]) == pytest.approx((0.5 - 0.25) / 2, rel=1e-6)
    assert float(metrics["accuracy"]) == 0.5


def test_dpo_loss_is_log2_when_the_model_is_the_reference():
    e = torch.rand(8)
    f = torch.rand(8)
    loss, metrics = diffusion_dpo_loss(e, f, e, f, beta=2500.0)
    assert float(loss) == pytest.approx(math.log(2), rel=1e-7)
    assert float(metrics["reward_margin"]) == 0.0


def test_one_sgd_step_lowers_the_winners_error_relative_to_the_losers():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    ref = torch.nn.Linear(16, 16)
    ref.load_state_dict(model.state_dict())
    x_w, x_l, target_w, target_l = (torch.randn(4, 16) for _ in range(4))

    def errors(m):
        return per_sample_error(m(x_w), target_w), per_sample_error(m(x_l), target_l)

    with torch.no_grad():
        rw, rl = errors(ref)
    before = errors(model)
    loss, _ = diffusion_dpo_loss(*before, rw, rl, beta=50.0)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.01 * p.grad
        after = errors(model)
    assert float((after[0] - after[1]).mean()) < float((before[0] - before[1]).mean().detach())


def test_posterior_mean_is_x0_at_t0_and_between_otherwise():
    ac = torch.linspace(0.999, 0.01, 1000)
    x0, xt = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    assert torch.allclose(ddpm_posterior_mean(xt, x0, torch.tensor([0]), ac), x0)
    mid = ddpm_posterior_mean(xt, x0, torch.tensor([500]), ac)
    assert (mid > 0).all() and (mid < 1).all()


def test_stat_matching_is_zero_for_equal_latents_and_positive_otherwise():
    a = torch.randn(2, 4, 8, 8)
    assert float(stat_matching_loss(a, a)) == 0.0
    assert float(stat_matching_loss(a + 0.1, a)) == pytest.approx(0.01, rel=1e-5)


def test_on_the_tiny_unet_stat_loss_is_zero_at_init_and_reaches_the_lora():
    from core.tiny_models import build_tiny_pipeline
    from trainers.methods.hg_dpo import dpo_objectives
    from trainers.model import TrainableModel

    model = TrainableModel(build_tiny_pipeline("tiny-sd15"), rank=4)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    t = torch.tensor([300, 700]).repeat(2)
    noisy = model.add_noise(latents, noise, t)
    cond = model.conditioning(["two hands"] * 4)
    dpo, stat, _ = dpo_objectives(model, noisy, t, noise, cond, None, 2, 2500.0)
    assert float(stat.detach()) == 0.0 and float(dpo.detach()) == pytest.approx(math.log(2), abs=1e-6)  # B = 0
    with torch.no_grad():
        for name, p in model.trainable.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    dpo, stat, _ = dpo_objectives(model, noisy, t, noise, cond, None, 2, 2500.0)
    assert float(stat.detach()) > 0
    stat.backward()
    grads = [p.grad for p in model.trainable.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
