"""The FairHuman ControlNet trainer on the tiny SD1.5 model with real photos: MPD really applied
to the ControlNet's update, learning, exact resume, condition dropout, the exported file."""
import json

import pytest
import torch

from train_helpers import assert_all_losses_fall, assert_killed_run_resumes_exactly, lora_tensors, run_trainers, train_cli
from core.fileio import read_events

pytestmark = pytest.mark.slow

COMMON = ["--method", "fairhuman-controlnet", "--base", "tiny-sd15", "--resolution", "64", "--lr", "1e-3",
          "--batch-size", "2", "--seed", "0"]


@pytest.fixture(scope="module")
def posed(sample_photos, tmp_path_factory):
    """The sample photos, downscaled to 384 px (loading full-size photos would dominate every
    step at 64 px), annotated with masks and pose conditions."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("posed")
    for path in sample_photos:
        with Image.open(path) as im:
            im.thumbnail((384, 384))
            im.save(folder / path.name, quality=95)
    result = run_trainers("annotate", folder, "--pose", "--workers", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def _setup(posed, **overrides):
    from trainers.config import TrainConfig
    from trainers.methods import method_module
    from trainers.train_job import build_model

    cfg = TrainConfig(**{**dict(method="fairhuman-controlnet", base="tiny-sd15", data=str(posed), resolution=64,
                                batch_size=2, seed=0, flip_p=0.0), **overrides})
    model = build_model(cfg)
    return cfg, model, method_module(cfg.method).METHOD(cfg, model)


def test_the_controlnet_update_is_that_steps_mpd_combination(posed):
    """d = Σ w_i g_i with the MPD weights of this step's Gramian — not the plain sum, not the
    weights of another step (the reference code's ControlNet variant trains on the plain sum)."""
    from core.weighting import mpd_weights
    from trainers.loop import Distributed, StepGradients, step_generator

    cfg, model, method = _setup(posed, condition_dropout=0.0)
    names = [n for n, _ in model.trainable.named_parameters()]
    assert any(n.startswith("controlnet_cond_embedding.") for n in names)
    assert not any("lora_" in n for n in names)
    params = model.trainable.parameters()
    with torch.no_grad():  # move off the zero-convolution start, so every layer has a gradient
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-3)

    def objective_gradients(step):
        out = method.losses(method.batch(step, 0), step_generator(cfg.seed, step, 0))
        assert bool(out.active.all()), "pick steps where all three objectives are active"
        rows = []
        for i in range(3):
            grads = torch.autograd.grad(out.losses[i], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                   for g, p in zip(grads, params)]))
        return torch.stack(rows)

    g_step, g_other = objective_gradients(1), objective_gradients(2)
    w_step = mpd_weights(g_step @ g_step.T)
    w_other = mpd_weights(g_other @ g_other.T)

    combiner = StepGradients(method, params, cfg, Distributed())
    for p in params:
        p.grad = None
    combiner.backward(method.losses(method.batch(1, 0), step_generator(cfg.seed, 1, 0)), 1.0)
    used = combiner.finish(step_generator(cfg.seed, 1, cfg.grad_accum))
    d = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

    expected = w_step @ g_step
    tol = 1e-4 * expected.norm()
    assert torch.allclose(used.float(), w_step.float(), rtol=1e-4, atol=1e-6)
    assert (d - expected).norm() <= tol
    assert (d - g_step.sum(0)).norm() > 100 * tol, "the plain sum would pass too"
    assert (d - w_other @ g_step).norm() > 100 * tol, "another step's weights would pass too"


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    from controlnet_helpers import make_conditioned_dataset

    return make_conditioned_dataset(tmp_path_factory.mktemp("conditioned"), count=6, size=32)


def test_condition_dropout_happens_at_the_configured_rate_on_the_batch_stream(conditioned):
    """The conditions the ControlNet receives over 300 samples: about 30 % black, the rest the
    dataset's aligned crop as it is; the same draws when the stream is replayed (seeded by step).
    The ControlNet's input is captured by a hook that then stops the step (no need to run it)."""
    from trainers.loop import step_generator

    class Captured(Exception):
        pass

    cfg, model, method = _setup(conditioned, condition_dropout=0.3, batch_size=5, resolution=32)

    def capture(_module, _args, kwargs):
        raise Captured(kwargs["controlnet_cond"].detach().clone())

    model.trainable.controlnet.register_forward_pre_hook(capture, with_kwargs=True)

    def stream(steps):
        for step in range(steps):
            batch = method.batch(step, 0)
            with pytest.raises(Captured) as caught:
                method.losses(batch, step_generator(cfg.seed, step, 0))
            yield batch, caught.value.args[0]

    drops = []
    for batch, given in stream(60):
        black = given.flatten(1).abs().amax(1) == 0
        assert not batch["condition"].flatten(1).abs().amax(1).eq(0).any()  # the data itself is never black
        for i in torch.nonzero(~black).flatten().tolist():
            assert torch.equal(given[i], batch["condition"][i])
        drops.extend(black.tolist())
    rate = sum(drops) / len(drops)
    assert len(drops) == 300 and abs(rate - 0.3) < 0.08, rate
    replay = [b for _, given in stream(10) for b in (given.flatten(1).abs().amax(1) == 0).tolist()]
    assert replay == drops[:50]
    cfg.condition_dropout = 0.0
    assert not any(b for _, given in stream(5) for b in (given.flatten(1).abs().amax(1) == 0).tolist())


def test_thirty_steps_lower_all_three_losses_and_export_a_diffusers_controlnet(posed, tmp_path):
    result = train_cli(*COMMON, "--data", posed, "--output", tmp_path, "--steps", 30, "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_all_losses_fall(tmp_path, 30)
    path = tmp_path / "fairhumancontrolnet_sd15.safetensors"
    tensors = lora_tensors(path)
    assert "controlnet_cond_embedding.conv_in.weight" in tensors and "controlnet_mid_block.weight" in tensors
    from core.lora_format import read_lora_metadata

    meta = {k.removeprefix("fairhuman."): v for k, v in read_lora_metadata(path).items()}
    assert meta["method"] == "fairhuman-controlnet" and meta["trainable"] == "controlnet"
    assert meta["condition_dropout"] == 0.3 and meta["weighting"] == "mpd" and meta["steps"] == 30
    from diffusers import ControlNetModel

    config = meta["diffusers_config"]
    net = ControlNetModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    net.load_state_dict(tensors)  # every key is a diffusers ControlNet key, none missing
    assert float(tensors["controlnet_mid_block.weight"].abs().max()) > 0  # trained off its zero start


def test_sigkill_then_resume_gives_the_same_controlnet(posed, tmp_path):
    straight = assert_killed_run_resumes_exactly([*COMMON, "--steps", 8, "--checkpoint-every", 3, "--data", posed],
                                                 tmp_path, kill_at=6)
    assert (straight / "fairhumancontrolnet_sd15.safetensors").is_file()


def test_a_dataset_without_conditions_is_refused_with_the_fix(tmp_path):
    from train_helpers import make_region_dataset

    data = make_region_dataset(tmp_path / "plain", count=2, size=64)
    result = train_cli(*COMMON, "--data", data, "--output", tmp_path / "run", "--steps", 1)
    text = result.stderr + json.dumps(read_events(tmp_path / "run" / "events.jsonl")) if (tmp_path / "run").exists() \
        else result.stderr
    assert result.returncode != 0 and "annotate" in text and "--pose" in text


@pytest.fixture(scope="module")
def conditioned64(tmp_path_factory):
    from controlnet_helpers import make_conditioned_dataset

    return make_conditioned_dataset(tmp_path_factory.mktemp("conditioned64"), count=2, size=64)


def test_an_sdxl_controlnet_trains_with_its_text_time_conditioning(conditioned64, tmp_path):
    result = train_cli("--method", "fairhuman-controlnet", "--base", "tiny-sdxl", "--resolution", 64,
                       "--batch-size", 1, "--lr", "1e-3", "--data", conditioned64, "--output", tmp_path,
                       "--steps", 2, "--checkpoint-every", 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tensors = lora_tensors(tmp_path / "fairhumancontrolnet_sdxl.safetensors")
    assert "add_embedding.linear_1.weight" in tensors and "controlnet_cond_embedding.conv_in.weight" in tensors
