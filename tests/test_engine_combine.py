"""The fair gradient combination on the tiny SDXL-shaped UNet with a LoRA."""
import copy
import socket
import subprocess
import sys

import pytest
import torch

from core.combine import FairCombiner
from core.objectives import regional_losses
from core.weighting import get_weighting
from train_helpers import ROOT, make_region_dataset


@pytest.fixture(scope="module")
def lora_unet(tiny_sdxl):
    from peft import LoraConfig

    # a copy: the adapter wraps the modules (peft's base_layer stays after delete_adapters), and the
    # session's pipeline is shared with other files (one exports it as a checkpoint)
    unet = copy.deepcopy(tiny_sdxl.unet)
    unet.requires_grad_(False)
    torch.manual_seed(0)
    # gaussian init: B != 0, so every LoRA tensor gets a gradient
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="combine")
    unet.set_adapter("combine")
    for name, p in unet.named_parameters():
        p.requires_grad_(".combine." in name)
        if ".combine." in name and "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.05)  # B = 0 would leave every A without gradient
    params = [p for p in unet.parameters() if p.requires_grad]
    yield unet, params


def _batch(n=2, seed=0, empty_hand=False):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 16, 16, generator=g)
    noise = torch.randn(n, 4, 16, 16, generator=g)
    face = torch.zeros(n, 1, 16, 16)
    face[:, :, 2:8, 3:9] = 1
    hand = torch.zeros(n, 1, 16, 16)
    if not empty_hand:
        hand[:, :, 11:13, 10:11] = 1
    cond = torch.randn(n, 77, 96, generator=g)
    pooled = torch.randn(n, 64, generator=g)
    time_ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]]).repeat(n, 1)
    return dict(latents=latents, noise=noise, face=face, hand=hand, cond=cond, pooled=pooled,
                time_ids=time_ids, t=torch.tensor([100, 700])[:n])


def _losses(unet, b, sl=slice(None), scale=1.0):
    pred = unet(b["latents"][sl] + b["noise"][sl], b["t"][sl], encoder_hidden_states=b["cond"][sl],
                added_cond_kwargs={"text_embeds": b["pooled"][sl], "time_ids": b["time_ids"][sl]}).sample
    losses, active = regional_losses(pred, b["noise"][sl], b["face"][sl], b["hand"][sl])
    return losses * scale, active


def _grads(params):
    return [p.grad.detach().clone() for p in params]


def _close(a, b, rtol=1e-5, atol=None):
    """Equal up to fp32 summation order: relative to each tensor's scale."""
    return all(torch.allclose(x, y, rtol=rtol, atol=(atol if atol is not None else rtol * float(y.abs().max())))
               for x, y in zip(a, b))


def test_ls_ones_equals_the_gradient_of_the_sum(lora_unet):
    unet, params = lora_unet
    b = _batch()
    losses, active = _losses(unet, b)
    expected = torch.autograd.grad(losses.sum(), params, retain_graph=True)
    combiner = FairCombiner(params, get_weighting("ls"), 3)
    combiner.add(losses, active)
    step = combiner.step()
    assert torch.equal(step.weights, torch.ones(3))
    assert _close(_grads(params), expected)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_loss_scale_2_16_leaves_the_update_unchanged(lora_unet, as_tensor):
    """The scale is divided out of the Gramian: same weights; .grad stays in the scaled domain
    (as after ``scaler.scale(loss).backward()``), so ``GradScaler.unscale_`` recovers d exactly."""
    unet, params = lora_unet
    b = _batch(seed=1)
    plain = FairCombiner(params, get_weighting("mpd"), 3)
    plain.add(*_losses(unet, b))
    step_plain = plain.step()
    g_plain = _grads(params)
    scaled = FairCombiner(params, get_weighting("mpd"), 3)
    losses, active = _losses(unet, b)
    scale = torch.tensor(2.0**16) if as_tensor else 2.0**16
    scaled.add(losses * scale, active, loss_scale=scale)
    step_scaled = scaled.step()
    assert torch.allclose(step_plain.weights, step_scaled.weights, rtol=1e-4)
    assert torch.allclose(step_plain.gram, step_scaled.gram, rtol=1e-4)
    assert _close(g_plain, [g / 2.0**16 for g in _grads(params)], rtol=1e-4)
    # unscaled without it: the weights would change (MPD is not scale-invariant)
    unaware = FairCombiner(params, get_weighting("mpd"), 3)
    unaware.add(*_losses(unet, b, scale=2.0**16))
    assert not torch.allclose(step_plain.weights, unaware.step().weights, rtol=1e-2)


def test_two_half_micro_batches_equal_one_full_batch(lora_unet):
    unet, params = lora_unet
    b = _batch(seed=2)
    full = FairCombiner(params, get_weighting("mpd"), 3)
    full.add(*_losses(unet, b))
    w_full = full.step().weights
    g_full = _grads(params)
    halves = FairCombiner(params, get_weighting("mpd"), 3)
    for i in range(2):
        losses, active = _losses(unet, b, slice(i, i + 1))
        halves.add(losses / 2, active)
    w_half = halves.step().weights
    assert torch.allclose(w_full, w_half, rtol=1e-4)
    assert _close(g_full, _grads(params), rtol=1e-4)


def test_empty_hand_mask_gives_finite_update_and_zero_weight(lora_unet):
    unet, params = lora_unet
    losses, active = _losses(unet, _batch(seed=3, empty_hand=True))
    assert active.tolist() == [True, True, False] and losses[2] == 0
    combiner = FairCombiner(params, get_weighting("mpd"), 3)
    combiner.add(losses, active)
    step = combiner.step()
    assert step.weights[2] == 0 and step.weights[:2].gt(0).all()
    assert all(torch.isfinite(g).all() for g in _grads(params))


def test_clipping_applies_to_the_combined_gradient(lora_unet):
    unet, params = lora_unet
    combiner = FairCombiner(params, get_weighting("mpd"), 3)
    combiner.add(*_losses(unet, _batch(seed=4)))
    combiner.step()
    d = _grads(params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in d]))
    torch.nn.utils.clip_grad_norm_(params, float(norm) / 10)
    assert _close([x / 10 for x in d], _grads(params), rtol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_on_weights_and_lora(tmp_path):
    data = make_region_dataset(tmp_path / "data", count=4)
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(ROOT / "tests" / "dist_worker.py"), str(data), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-4000:]
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    assert r0["seen"] != r1["seen"]  # each rank trained on its own images
    assert r0["weights"] == r1["weights"]
    for key in r0["lora"]:
        assert torch.equal(r0["lora"][key], r1["lora"][key]), key
    for r in (r0, r1):  # flags, per-objective gradients, the finite vote: all on the gradients' device
        assert len(r["collective_devices"]) >= 3 * 3
        assert set(r["collective_devices"]) == {r["grad_device"]}


def test_batched_vjp_equals_k_backward_passes(lora_unet):
    unet, params = lora_unet
    b = _batch(seed=5)
    batched = FairCombiner(params, get_weighting("mpd"), 3, batched=True)
    batched.add(*_losses(unet, b))
    assert batched.batched, "the batched product fell back to K backward passes on the tiny UNet"
    w_batched = batched.step().weights
    g_batched = _grads(params)
    looped = FairCombiner(params, get_weighting("mpd"), 3, batched=False)
    looped.add(*_losses(unet, b))
    assert torch.allclose(w_batched, looped.step().weights, rtol=1e-5)
    assert _close(g_batched, _grads(params), rtol=1e-5)
