"""The dtype policy on the CPU (bf16 and fp16 autocast both run there), the GradScaler path through
the fair combiner, gradient checkpointing with the batched product, device choice for
collectives, and errors that are not swallowed (OOM, a missing batching rule)."""
import argparse
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from core.combine import FairCombiner
from core.fileio import EventLog, read_events
from core.objectives import regional_losses
from core.weighting import get_weighting
from train_helpers import make_region_dataset

# bf16 keeps 8 mantissa bits (about 3% error in a step's gradient here). After 5 AdamW steps the
# bf16-trained LoRA changes the model's output as the fp32-trained one does, to within
# BF16_OUTPUT_TOLERANCE (relative L2 distance of the output change; measured 0.031); in parameter
# space the distance is larger (measured 0.16) because AdamW's per-element normalization turns a
# sign error on a near-zero gradient into a full learning-rate step.
BF16_OUTPUT_TOLERANCE = 0.1
BF16_PARAMETER_TOLERANCE = 0.3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_region_dataset(tmp_path_factory.mktemp("precision"), count=4, size=64)


def _cfg(dataset, out, **overrides):
    from trainers.config import TrainConfig

    values = dict(method="fairhuman", base="tiny-sdxl", data=str(dataset), output=str(out), steps=5,
                  resolution=64, rank=4, lr=1e-3, batch_size=2, checkpoint_every=0)
    values.update(overrides)
    return TrainConfig(**values)


def _run(cfg, out):
    from trainers.train_job import run_job

    out.mkdir(parents=True, exist_ok=True)
    return run_job(cfg, out, EventLog(out / "events.jsonl", echo=False), resume=False,
                   stop_requested=lambda: False, keep_model=True)


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].flatten().float() for k in sorted(state)])


@pytest.mark.slow
def test_bf16_run_is_finite_and_close_to_fp32(dataset, tmp_path):
    from trainers.train_job import build_model

    initial = _flat(build_model(_cfg(dataset, tmp_path / "init")).trainable.state_dict())
    fp32 = _run(_cfg(dataset, tmp_path / "fp32"), tmp_path / "fp32")
    bf16 = _run(_cfg(dataset, tmp_path / "bf16", mixed_precision="bf16", sample_every=5, sample_prompts=["a hand"],
                     sample_steps=2), tmp_path / "bf16")
    assert fp32["status"] == bf16["status"] == "done" and bf16["nan_steps"] == 0
    # validation samples under the policy too: the denoising in bf16, the VAE decode in fp32
    from PIL import Image

    with Image.open(tmp_path / "bf16" / "samples" / "step_0000005_0.png") as image:
        assert image.size == (64, 64)
    model = bf16["model"]
    # the policy, as applied: frozen UNet and text encoders bf16, VAE and the LoRA fp32
    assert model.unet.conv_in.weight.dtype == torch.bfloat16
    assert model.pipe.text_encoder.dtype == model.pipe.text_encoder_2.dtype == torch.bfloat16
    assert model.pipe.vae.dtype == torch.float32
    assert {p.dtype for p in model.trainable.parameters()} == {torch.float32}
    states = {"fp32": fp32["model"].trainable.state_dict(), "bf16": model.trainable.state_dict()}
    change32, change16 = _flat(states["fp32"]) - initial, _flat(states["bf16"]) - initial
    assert torch.isfinite(change16).all() and change32.norm() > 0
    distance = float((change16 - change32).norm() / change32.norm())
    assert 0 < distance <= BF16_PARAMETER_TOLERANCE, f"bf16 LoRA change {distance:.3f} from fp32's"

    probe = fp32["model"]  # an fp32 model: outputs with each LoRA, computed alike
    g = torch.Generator().manual_seed(5)
    noisy, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([50, 300, 600, 900])
    cond, time_ids = probe.conditioning(["a photo of a person waving hands"] * 4), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 4)

    def output(state):
        probe.trainable.load_state_dict(state)
        with torch.no_grad():
            return probe.predict(noisy, t, cond, time_ids)

    before = output(build_model(_cfg(dataset, tmp_path / "init")).trainable.state_dict())
    out32, out16 = output(states["fp32"]), output(states["bf16"])
    output_distance = float((out16 - out32).norm() / (out32 - before).norm())
    assert output_distance <= BF16_OUTPUT_TOLERANCE, f"bf16 output change {output_distance:.3f} from fp32's"


def _one_step_gradient(dataset, tmp_path, mixed_precision: str, init_scale, *, aware: bool = True):
    """One real fair step (StepGradients + GradScaler.unscale_, as the loop runs it): the
    weights and the combined gradient in true units."""
    from trainers.loop import Distributed, StepGradients, step_generator
    from trainers.methods.fairhuman import FairHuman
    from trainers.train_job import build_model

    cfg = _cfg(dataset, tmp_path, mixed_precision=mixed_precision)
    model = build_model(cfg)
    with torch.no_grad():  # B != 0, so every LoRA tensor has a gradient
        g = torch.Generator().manual_seed(0)
        for name, p in model.trainable.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    method = FairHuman(cfg, model)
    params = model.trainable.parameters()
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale or 1.0, enabled=init_scale is not None)
    grads = StepGradients(method, params, cfg, Distributed(), scaler=scaler)
    if not aware:  # the reference code's way: the scaler's scale left in the Gramian
        grads._loss_scale = lambda device: 1.0
    out = method.losses(method.batch(0, 0), step_generator(0, 0))
    grads.backward(out, 1.0)
    weights = grads.finish(step_generator(0, 0, 1))
    scaler.unscale_(torch.optim.SGD(params, lr=0.0))
    return weights, torch.cat([p.grad.flatten() for p in params])


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def test_fp16_scaler_gives_the_same_update_for_scales_2_8_and_2_16(dataset, tmp_path):
    w8, d8 = _one_step_gradient(dataset, tmp_path, "fp16", 2.0**8)
    w16, d16 = _one_step_gradient(dataset, tmp_path, "fp16", 2.0**16)
    w32, d32 = _one_step_gradient(dataset, tmp_path, "no", None)
    assert torch.isfinite(d8).all() and torch.isfinite(d16).all()
    # equal up to fp16 rounding in the backward (measured: weights 3e-5, d 1.2e-3)
    assert _relative(w8, w16) <= 1e-3 and _relative(d8, d16) <= 1e-2
    assert _relative(d16, d32) <= 2e-2  # and close to the fp32 update (measured 5e-3)
    # without dividing the scale out of the Gramian the MPD weights would follow the scale
    w_unaware, _ = _one_step_gradient(dataset, tmp_path, "fp16", 2.0**16, aware=False)
    assert _relative(w_unaware, w16) > 0.5


@pytest.mark.slow
def test_fp16_step_whose_gradients_overflow_is_skipped_and_counted(dataset, tmp_path, monkeypatch):
    from trainers.precision import Precision

    make_scaler = Precision.make_scaler
    # 2^21 overflows fp16 in this model's backward (65504 / 2^21 ≈ 0.03): the scaler must skip
    monkeypatch.setattr(Precision, "make_scaler", lambda self, init_scale=2.0**21: make_scaler(self, init_scale))
    result = _run(_cfg(dataset, tmp_path, mixed_precision="fp16", steps=5), tmp_path)
    events = read_events(tmp_path / "events.jsonl")
    skipped = [e for e in events if e["event"] == "nan"]
    progress = [e for e in events if e["event"] == "progress"]
    assert result["status"] == "done" and 1 <= len(skipped) < 5, skipped
    assert all(e["cause"] == "gradient overflow" for e in skipped)
    assert [e["loss_scale"] for e in skipped] == [2.0 ** (20 - i) for i in range(len(skipped))]
    assert result["nan_steps"] == len(skipped) and len(progress) == 5 - len(skipped)
    lora = _flat(result["model"].trainable.state_dict())
    assert torch.isfinite(lora).all()


def test_gradient_checkpointing_with_the_batched_product_gives_the_same_gradients(tiny_sdxl):
    from core.tiny_models import build_tiny_pipeline
    from trainers.model import TrainableModel

    def gradients(checkpointing: bool):
        model = TrainableModel(build_tiny_pipeline("tiny-sdxl"), rank=4, gradient_checkpointing=checkpointing)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for name, p in model.trainable.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        calls = Counter()
        block = next(m for m in model.unet.modules() if type(m).__name__ == "BasicTransformerBlock")
        # a pre-hook: checkpointing's recomputation stops early, before a forward hook would run
        block.register_forward_pre_hook(lambda *_: calls.update(["forward"]))
        g = torch.Generator().manual_seed(1)
        noisy, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        face, hand = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
        face[:, :, 1:4, 1:4], hand[:, :, 5:7, 5:6] = 1, 1
        pred = model.predict(noisy, torch.tensor([10, 600]), model.conditioning(["a photo", "hands"]),
                             torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
        params = model.trainable.parameters()
        combiner = FairCombiner(params, get_weighting("mpd"), 3, batched=True)
        combiner.add(*regional_losses(pred, noise, face, hand))
        assert combiner.batched, combiner.fallback_reason
        weights = combiner.step().weights
        return weights, [p.grad.clone() for p in params], calls["forward"]

    w_plain, g_plain, calls_plain = gradients(False)
    w_ckpt, g_ckpt, calls_ckpt = gradients(True)
    assert calls_ckpt > calls_plain  # checkpointing really recomputed the block in the backward
    assert torch.allclose(w_plain, w_ckpt, rtol=1e-5)
    for a, b in zip(g_plain, g_ckpt):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


class _SyncOps(TorchDispatchMode):
    """Counts the operators that make a GPU wait for the host: reading a value (item, bool,
    tolist), a data-dependent shape (nonzero), linalg's error check."""

    SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten._linalg_check_errors", "aten.masked_select")

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.SYNCS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _fair_losses(tiny_model):
    g = torch.Generator().manual_seed(1)
    noisy, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    face, hand = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)  # no hand: an inactive objective
    face[:, :, 1:4, 1:4] = 1
    pred = tiny_model.predict(noisy, torch.tensor([10, 600]), tiny_model.conditioning(["a", "b"]),
                              torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    return regional_losses(pred, noise, face, hand)


@pytest.fixture(scope="module")
def tiny_model():
    from core.tiny_models import build_tiny_pipeline
    from trainers.model import TrainableModel

    return TrainableModel(build_tiny_pipeline("tiny-sdxl"), rank=4)


class _DeviceOnes:
    """A weighting computed on the device alone, so the combiner's own host reads are counted."""

    def __call__(self, gram, losses, generator=None, active=None):
        return torch.ones_like(torch.diagonal(gram))


def test_the_fair_step_reads_the_host_once_per_optimizer_step(tiny_model):
    params = tiny_model.trainable.parameters()
    combiner = FairCombiner(params, _DeviceOnes(), 3)
    scale = torch.tensor(2.0**10)
    combiner.add(*_fair_losses(tiny_model))  # a first micro-batch, then one observed
    losses, active = _fair_losses(tiny_model)
    with _SyncOps() as add:
        combiner.add(losses * scale, active, loss_scale=scale)
    assert add.ops == {}, f"add() synchronised: {dict(add.ops)}"
    with _SyncOps() as step:
        result = combiner.step()
    assert step.ops == {"aten.nonzero": 1}, dict(step.ops)  # the active flags, once
    assert result.weights.tolist() == [1.0, 1.0, 0.0]


def test_the_mpd_weighting_does_not_synchronise(tiny_model):
    combiner = FairCombiner(tiny_model.trainable.parameters(), get_weighting("mpd"), 3)
    combiner.add(*_fair_losses(tiny_model))
    with _SyncOps() as step:
        combiner.step()
    assert step.ops == {"aten.nonzero": 1}, dict(step.ops)


def test_only_a_missing_batching_rule_falls_back(tiny_model, monkeypatch):
    params = tiny_model.trainable.parameters()
    real = torch.autograd.grad

    def failing(message, kind=RuntimeError):
        def grad(*args, **kwargs):
            if kwargs.get("is_grads_batched"):
                raise kind(message)
            return real(*args, **kwargs)
        return grad

    reasons = []
    monkeypatch.setattr(torch.autograd, "grad", failing("Batching rule not implemented for aten::fake_op; "
                                                        "the fallback path doesn't work on out= or view ops."))
    combiner = FairCombiner(params, get_weighting("ls"), 3, on_fallback=reasons.append)
    combiner.add(*_fair_losses(tiny_model))
    combiner.add(*_fair_losses(tiny_model))
    assert not combiner.batched and len(reasons) == 1 and "aten::fake_op" in reasons[0]
    combiner.step()
    assert all(torch.isfinite(p.grad).all() for p in params)
    for message, kind in (("some other bug", RuntimeError),
                          ("CUDA out of memory. Tried to allocate 2.00 GiB", torch.OutOfMemoryError),
                          ("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB; out of memory",
                           RuntimeError)):
        monkeypatch.setattr(torch.autograd, "grad", failing(message, kind))
        combiner = FairCombiner(params, get_weighting("ls"), 3, on_fallback=reasons.append)
        with pytest.raises(kind, match=message.split(".")[0][:20]):
            combiner.add(*_fair_losses(tiny_model))
        assert combiner.batched and len(reasons) == 1


def _train_args(dataset, out, *extra):
    from trainers.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--method", "fairhuman", "--base", "tiny-sdxl", "--data", str(dataset), "--output",
                              str(out), "--steps", "2", "--resolution", "64", "--rank", "4", "--batch-size", "2",
                              "--checkpoint-every", "0", *extra])


@pytest.mark.slow
def test_an_oom_in_the_batched_product_reaches_the_error_event(dataset, tmp_path, monkeypatch):
    from trainers.train import run

    real = torch.autograd.grad

    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.50 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    assert run(_train_args(dataset, tmp_path)) == 1
    events = read_events(tmp_path / "events.jsonl")
    assert not [e for e in events if e["event"] == "warning"]  # no silent fallback
    error = events[-1]
    assert error["event"] == "error" and "out of memory" in error["message"]
    for advice in ("--gradient-checkpointing", "--rank", "--resolution", "--batched-vjp false"):
        assert advice in error["message"], error["message"]


@pytest.mark.slow
def test_a_missing_batching_rule_is_logged_once_and_the_run_finishes(dataset, tmp_path, monkeypatch):
    from trainers.train import run

    real = torch.autograd.grad

    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for aten::fake_op. We could not generate a fallback.")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    assert run(_train_args(dataset, tmp_path, "--mixed-precision", "bf16")) == 0
    events = read_events(tmp_path / "events.jsonl")
    warnings = [e for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and "aten::fake_op" in warnings[0]["reason"]
    assert "K backward passes" in warnings[0]["message"]
    assert events[-1]["event"] == "done"


def test_collectives_use_the_process_group_device():
    from trainers.loop import Distributed, TrainingError, collective_device

    assert collective_device("nccl", 1) == torch.device("cuda", 1)
    assert collective_device("gloo", 1) == torch.device("cpu")

    class FakeGroup:  # a process group that records what it is handed
        class ReduceOp:
            MIN = "min"

        def __init__(self, backend):
            self.backend, self.seen = backend, []

        def is_available(self):
            return True

        def is_initialized(self):
            return True

        def get_world_size(self):
            return 2

        def get_rank(self):
            return 0

        def get_backend(self):
            return self.backend

        def all_reduce(self, tensor, op=None):
            self.seen.append(tensor.device)

    gloo = FakeGroup("gloo")
    dist = Distributed(gloo)
    dist.average([torch.ones(3)])
    dist.all_true(torch.tensor(True))
    assert gloo.seen == [torch.device("cpu")] * 2
    nccl = Distributed(FakeGroup("nccl"))
    assert nccl.device == torch.device("cuda", 0)
    with pytest.raises(TrainingError, match="needs cuda:0"):  # a host tensor never reaches NCCL
        nccl.average([torch.ones(3)])


def test_training_device_choice(monkeypatch):
    from trainers.train_job import training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("", {}) == torch.device("cpu")
    assert training_device("cpu", {}) == torch.device("cpu")
    with pytest.raises(ValueError, match="0 CUDA device"):
        training_device("cuda:1", {})
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        training_device("cuda:1", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert training_device("", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == torch.device("cuda", 1)
    assert training_device("cuda:1", {}) == torch.device("cuda", 1)
    assert training_device("", {}) == torch.device("cuda", 0)


def test_device_option_is_validated(dataset, tmp_path):
    from trainers.config import validate

    validate(_cfg(dataset, tmp_path, device="cuda:1"))
    with pytest.raises(Exception, match="--device 'gpu1'"):
        validate(_cfg(dataset, tmp_path, device="gpu1"))


def test_full_size_models_build_from_the_shipped_configs():
    """What ``bench gpu`` builds at full size, on the meta device (no memory, no weights)."""
    from trainers.benchmarks.fairhuman import add_lora
    from trainers.benchmarks.gpu import full_size_unet

    sdxl = full_size_unet("sdxl", "meta", torch.bfloat16)
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684
    lora = add_lora(sdxl, 256)  # the paper's rank: 1.49 GB of fp32 LoRA, a 4.46 GB params x 3 buffer
    assert sum(p.numel() for p in lora) == 371_589_120 and {p.dtype for p in lora} == {torch.float32}
    assert sum(p.numel() for p in full_size_unet("sd15", "meta", torch.float32).parameters()) == 859_520_964


@pytest.mark.slow
def test_bench_gpu_smoke_runs_on_the_cpu():
    from train_helpers import run_trainers

    # bf16: the CPU's fp16 kernels are emulated (ten times slower); the code path is the same
    result = run_trainers("bench", "gpu", "--smoke", "--dtypes", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("device: CPU")
    for checkpointing in ("off", "on"):
        for step in ("plain", "floor", "mpd", "mpd-loop", "reference"):
            assert f"| bf16 | {checkpointing} | {step} |" in out, (checkpointing, step, out)
    assert "LAN sampling / plain sampling time" in out and "DPO step / plain LoRA step peak memory" in out
    assert "| mpd extra ≤ (K-1) x LoRA + 5%" in out and "| reference / mpd ≥ 1.3" in out


@pytest.mark.slow
def test_fp16_resume_restores_the_loss_scale(dataset, tmp_path, monkeypatch):
    """Cancelled after the scaler has backed off, then resumed: the same LoRA bit for bit (a
    resumed run that restarted at the initial scale would skip its next step again)."""
    from trainers.precision import Precision
    from trainers.train_job import run_job

    SMALL = dict(resolution=32)  # bit-exactness does not depend on the size
    make_scaler = Precision.make_scaler
    monkeypatch.setattr(Precision, "make_scaler", lambda self, init_scale=2.0**21: make_scaler(self, init_scale))
    straight = _run(_cfg(dataset, tmp_path / "a", mixed_precision="fp16", steps=6, **SMALL), tmp_path / "a")
    out = tmp_path / "b"
    out.mkdir()
    events = EventLog(out / "events.jsonl", echo=False)
    first = run_job(_cfg(dataset, out, mixed_precision="fp16", steps=6, **SMALL), out, events, resume=False,
                    stop_requested=lambda: True)  # stops after the first applied step
    assert first["status"] == "cancelled" and first["nan_steps"] >= 1
    resumed = run_job(_cfg(dataset, out, mixed_precision="fp16", steps=6, **SMALL), out, events, resume=True,
                      stop_requested=lambda: False, keep_model=True)
    a, b = straight["model"].trainable.state_dict(), resumed["model"].trainable.state_dict()
    assert resumed["status"] == "done" and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_precision_is_fp32_on_a_cpu_and_a_half_dtype_on_a_gpu():
    from trainers.config import RULES
    from trainers.precision import compute_dtype

    assert RULES["mixed_precision"]("auto") is None
    assert compute_dtype("auto", "cpu") == torch.float32 and compute_dtype("bf16", "cpu") == torch.bfloat16
    if torch.cuda.is_available():
        assert compute_dtype("auto", "cuda") == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
