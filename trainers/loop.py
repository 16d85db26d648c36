"""The one training loop, shared by every method.

Per optimizer step: ``grad_accum`` micro-batches, each giving K objective losses; the method's
``combine`` decides how they become a gradient — "fair" hands them to the engine's fair
combination (per-objective gradients, Gramian, weighting, d = Σ w_i g_i into ``.grad``), "sum"
does one backward of a fixed weighted sum. Then clipping of the combined gradient, the optimizer
and the LR schedule.

Exact resume: the noise and timesteps of a step come from a generator seeded by (seed, step) and
the data order is a pure function of (seed, step), so a checkpoint needs only the trained tensors,
the optimizer, the LR scheduler, the weighting's state and a few counters — and a resumed run
continues bit for bit on the CPU.

Several processes (accelerate launch): the UNet is *not* wrapped in DDP — the fair combination
needs the per-objective gradients, which DDP's hooks would sum away. Each rank computes its own
gradients and they are averaged with explicit all-reduces (per objective before the Gramian,
so every rank solves the same weights), which is what DDP would do for a plain sum.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from core.fileio import EventLog

from .run_dir import latest_checkpoint, load_checkpoint, save_checkpoint
from .methods.base import Method


class TrainingError(RuntimeError):
    """A failure the user can act on; its message goes into the error event."""


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """Noise and timesteps of one micro-batch on one process, a function of its coordinates."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 131 + micro) * 1009 + rank)


def resolve_optimizer(name: str) -> str:
    """``auto``: 8-bit AdamW where bitsandbytes works (a CUDA device), else AdamW."""
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "adamw"
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # not installed, or a build that fails at import
        return "adamw"
    return "adamw8bit"


def make_optimizer(cfg, params):
    name = resolve_optimizer(cfg.optimizer)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except Exception as err:  # ImportError, or a CUDA-less/unsupported build failing at import
            raise TrainingError(
                f"--optimizer adamw8bit needs a working bitsandbytes ({type(err).__name__}: {err}); "
                "install it for your GPU, or use --optimizer adamw"
            ) from err
    raise TrainingError(f"unknown optimizer {cfg.optimizer!r}: use adamw, adamw8bit or auto")


class Distributed:
    """The few collective operations the loop needs; a no-op on one process."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.active = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0

    def average(self, tensors: list[torch.Tensor]) -> None:
        if not self.active:
            return
        for tensor in tensors:
            self.dist.all_reduce(tensor)
            tensor.div_(self.world)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (so all skip, or all step, together)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        self.dist.all_reduce(value, op=self.dist.ReduceOp.MIN)
        return bool(value.item() > 0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class StepGradients:
    """Turns each micro-batch's losses into gradients; ``finish`` completes ``.grad`` for the
    optimizer step and returns the objective weights used."""

    def __init__(self, method: Method, params: list[torch.Tensor], cfg, dist: Distributed):
        self.method, self.params, self.dist = method, params, dist
        self.weighting = self.fair = None
        if method.combine == "fair":
            from core.combine import FairCombiner
            from core.weighting import get_weighting

            self.weighting = get_weighting(cfg.weighting, len(method.objective_names), **(cfg.weighting_options or {}))
            self.fair = FairCombiner(params, self.weighting, len(method.objective_names),
                                         reduce=dist.average if dist.active else None, batched=cfg.batched_vjp)

    def extra_parameters(self) -> list[torch.Tensor]:
        return self.weighting.parameters() if self.weighting is not None else []

    def backward(self, out, scale: float) -> None:
        if self.fair is not None:
            self.fair.add(out.losses * scale, out.active)
        else:
            weights = self.method.sum_weights().to(out.losses)
            (out.losses * weights * scale).sum().backward()

    def reset(self) -> None:
        if self.fair is not None:
            self.fair.reset()

    def finish(self, generator: torch.Generator) -> torch.Tensor:
        if self.fair is not None:
            return self.fair.step(generator).weights.detach().cpu()
        # a plain sum: average the gradient over processes, as DDP would
        self.dist.average([p.grad for p in self.params if p.grad is not None])
        return self.method.sum_weights()

    def state_dict(self) -> dict:
        return self.weighting.state_dict() if self.weighting is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.weighting is not None and state:
            self.weighting.load_state_dict(state)


def train(cfg, method: Method, run_dir: Path, events: EventLog, *, resume: bool = False,
          sampler=None, stop_requested=lambda: False) -> dict:
    """Run (or resume) the optimization. Returns a summary for the LoRA metadata.

    ``sampler(step)`` renders validation images. ``stop_requested()`` is polled after every
    step (a cancelled job): the loop then saves a checkpoint and returns with "cancelled".
    """
    from diffusers.optimization import get_scheduler

    model = method.model
    dist = Distributed()
    method.rank, method.world = dist.rank, dist.world
    params = model.trainable.parameters()
    combiner = StepGradients(method, params, cfg, dist)
    optimizer = make_optimizer(cfg, params + combiner.extra_parameters())
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
    )
    start, nan_total = 0, 0
    if resume:
        path = latest_checkpoint(run_dir)
        if path is not None:
            state = load_checkpoint(path)
            model.trainable.load_state_dict(state["trainable"] if "trainable" in state else state["lora"])
            optimizer.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            combiner.load_state_dict(state.get("weighting", {}))
            start, nan_total = int(state["step"]), int(state.get("nan_steps", 0))
            events.emit("resume", step=start, checkpoint=str(path))

    def evaluate(done: int) -> None:
        if dist.is_main:
            values = method.evaluate()
            if values:
                events.emit("eval", step=done, **values)

    if start == 0:
        evaluate(0)
    names = list(method.objective_names)
    nan_streak, last_weights = 0, None
    begin = time.perf_counter()
    for step in range(start, cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        step_losses = torch.zeros(len(names))
        finite, extra = True, {}
        for micro in range(cfg.grad_accum):
            generator = step_generator(cfg.seed, step, micro, dist.rank)
            out = method.losses(method.batch(step, micro), generator)
            values = out.losses.detach().float().cpu()
            if not torch.isfinite(values).all():
                finite = False
                break
            combiner.backward(out, 1.0 / cfg.grad_accum)
            step_losses += values / cfg.grad_accum
            for key, value in out.metrics.items():
                extra[key] = extra.get(key, 0.0) + float(value) / cfg.grad_accum
        if not dist.all_true(finite):
            # Skip the whole optimizer step: a partial accumulation would bias the update.
            optimizer.zero_grad(set_to_none=True)
            combiner.reset()
            nan_streak, nan_total = nan_streak + 1, nan_total + 1
            events.emit("nan", step=step + 1, streak=nan_streak, total=nan_total)
            if nan_streak >= cfg.max_nan_steps:
                raise TrainingError(
                    f"{nan_streak} consecutive steps had non-finite losses (last at step {step + 1}); "
                    "lower --lr, use --mixed-precision bf16 or no, or check the dataset"
                )
            continue
        nan_streak = 0
        weights = combiner.finish(step_generator(cfg.seed, step, cfg.grad_accum))
        grad_norm = _clip(params, cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        last_weights = weights.float().tolist()
        done = step + 1
        if dist.is_main and (done % cfg.log_every == 0 or done == cfg.steps):
            elapsed = time.perf_counter() - begin
            rate = (done - start) / elapsed if elapsed > 0 else 0.0
            events.emit(
                "progress", step=done, total=cfg.steps,
                losses={n: float(v) for n, v in zip(names, step_losses)},
                weights=last_weights, grad_norm=grad_norm, lr=lr_scheduler.get_last_lr()[0],
                it_per_s=rate, eta_s=(cfg.steps - done) / rate if rate else None, **extra,
            )
        cancel = stop_requested()
        periodic = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
        if dist.is_main and (periodic or cancel) and done < cfg.steps:
            path = save_checkpoint(run_dir, done, {
                "step": done, "trainable": model.trainable.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "weighting": combiner.state_dict(),
                "nan_steps": nan_total,
            }, keep=cfg.keep_checkpoints)
            events.emit("checkpoint", step=done, path=str(path))
        if dist.is_main and sampler is not None and cfg.sample_every and done % cfg.sample_every == 0:
            sampler(done)
        if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
            evaluate(done)
        if cancel:
            return {"status": "cancelled", "steps": done, "nan_steps": nan_total, "final_weights": last_weights}
    return {"status": "done", "steps": cfg.steps, "nan_steps": nan_total, "final_weights": last_weights}


def _clip(params, max_norm: float) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
