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

import contextlib
import os
import time
from pathlib import Path

import torch

from core.combine import is_out_of_memory
from core.fileio import NAN, WARNING, EventLog

from .run_dir import latest_checkpoint, load_checkpoint, save_checkpoint
from .methods.base import Method


class TrainingError(RuntimeError):
    """A failure the user can act on; its message goes into the error event."""


@contextlib.contextmanager
def out_of_memory_advice(where: str):
    """An out-of-memory error as a TrainingError that says what to change."""
    try:
        yield
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(err):
            raise
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise TrainingError(
            f"out of memory in {where} ({first}); use --gradient-checkpointing true, a smaller --rank or "
            "--resolution, or --batched-vjp false (K backward passes: less transient memory)") from err


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


def collective_device(backend: str, local_rank: int = 0) -> torch.device:
    """The device of the tensors a process group's collectives take: NCCL takes only CUDA
    tensors (this process's GPU, cuda:LOCAL_RANK, where its gradients live); gloo host ones."""
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


class Distributed:
    """The few collective operations the loop needs; a no-op on one process. Every tensor it
    hands to ``torch.distributed`` is on ``device``."""

    def __init__(self, dist=None):
        if dist is None:
            import torch.distributed as dist

        self.dist = dist
        self.active = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0
        self.device = (collective_device(str(dist.get_backend()), int(os.environ.get("LOCAL_RANK", "0")))
                       if self.active else torch.device("cpu"))

    def average(self, tensors: list[torch.Tensor]) -> None:
        if not self.active:
            return
        for tensor in tensors:
            if tensor.device != self.device:
                raise TrainingError(f"a tensor on {tensor.device} reached a collective of the "
                                    f"{self.dist.get_backend()} group, which needs {self.device}")
            self.dist.all_reduce(tensor)
            tensor.div_(self.world)

    def all_true(self, flag) -> bool:
        """Whether ``flag`` (a bool or a 0-dim tensor) holds on every process (so all skip, or
        all step, together). The one host read of an optimizer step."""
        if not self.active:
            return bool(flag)
        value = torch.as_tensor(flag).to(self.device, torch.float32).reshape(1)
        self.dist.all_reduce(value, op=self.dist.ReduceOp.MIN)
        return bool(value.item() > 0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class StepGradients:
    """Turns each micro-batch's losses into gradients; ``finish`` completes ``.grad`` for the
    optimizer step and returns the objective weights used.

    Amortized fairness (``--fair-every N``): the weights are solved from the per-objective
    gradients on every N-th step only; on the steps between, one backward of Σ w_i L_i with the
    last solved weights gives exactly d = Σ w_i g_i for those weights at the cost of a plain step.
    A weighting's own state (DWA's loss history, UW's parameters) moves on solving steps only.
    """

    def __init__(self, method: Method, params: list[torch.Tensor], cfg, dist: Distributed,
                 scaler: torch.amp.GradScaler | None = None, on_fallback=None):
        self.method, self.params, self.dist = method, params, dist
        # fp16: losses scaled by the GradScaler's scale; disabled (pass-through) otherwise
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        self.weighting = self.fair = None
        self.every = max(1, int(getattr(cfg, "fair_every", 1) or 1))
        self.solving = True  # this step solves the weights (always, unless amortized)
        self.last_weights: torch.Tensor | None = None  # of the last solve that was applied
        self.shares: torch.Tensor | None = None  # each objective's share of this step's update
        if method.combine == "fair":
            from core.combine import FairCombiner
            from core.weighting import get_weighting

            self.weighting = get_weighting(cfg.weighting, len(method.objective_names), **(cfg.weighting_options or {}))
            self.fair = FairCombiner(params, self.weighting, len(method.objective_names),
                                     reduce=dist.average if dist.active else None, batched=cfg.batched_vjp,
                                     on_fallback=on_fallback, match_norm=getattr(cfg, "match_norm", False))

    def extra_parameters(self) -> list[torch.Tensor]:
        return self.weighting.parameters() if self.weighting is not None else []

    def _loss_scale(self, device) -> torch.Tensor | float:
        """The scaler's scale as a tensor on ``device`` (no host read), or 1."""
        return self.scaler.scale(torch.ones((), device=device)) if self.scaler.is_enabled() else 1.0

    def begin(self, step: int) -> None:
        """Before a step's micro-batches: decide whether it solves the weights."""
        self.solving = self.fair is not None and (self.last_weights is None or step % self.every == 0)
        self.shares = None

    def backward(self, out, scale: float) -> None:
        losses = self.scaler.scale(out.losses * scale)
        if self.fair is not None and not self.solving:  # amortized: the last weights, one backward
            (losses * self.last_weights.to(losses)).sum().backward()
        elif self.fair is not None:
            self.fair.add(losses, out.active, loss_scale=self._loss_scale(losses.device))
        else:
            weights = self.method.sum_weights().to(losses)
            (losses * weights).sum().backward()

    def reset(self) -> None:
        if self.fair is not None:
            self.fair.reset()

    def finish(self, generator: torch.Generator) -> torch.Tensor:
        """``.grad`` of the step (in the scaler's scaled domain, for ``scaler.unscale_``) and
        the weights used (on the device)."""
        if self.fair is not None and self.solving:
            solved = self.fair.step(generator)
            weights, self.shares = solved.weights.detach(), solved.shares.detach()
            self._solved_active = solved.active.to(weights.device)
            if self.scaler.is_enabled():  # a weighting sets its parameters' .grad unscaled
                for p in self.extra_parameters():
                    if p.grad is not None:
                        p.grad.mul_(self._loss_scale(p.grad.device))
            return weights
        # a plain (or amortized weighted) sum: average the gradient over processes, as DDP would
        self.dist.average([p.grad for p in self.params if p.grad is not None])
        return self.last_weights if self.fair is not None else self.method.sum_weights()

    def commit(self, weights: torch.Tensor) -> None:
        """The step was applied: its solved weights serve the amortized steps that follow. An
        objective absent from this step's batch (no hand in it) keeps the weight of the last
        solve it was present in, rather than 0 until the next solve."""
        if self.fair is not None and self.solving:
            if self.last_weights is None:
                self.last_weights = weights
            else:
                self.last_weights = torch.where(self._solved_active, weights, self.last_weights.to(weights))

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
    scaler = model.precision.make_scaler()  # fp16 only; a pass-through otherwise

    def fallback(reason: str) -> None:
        events.emit(WARNING, message="the batched vector-Jacobian product is not supported by an operator of "
                    "this model; using K backward passes from now on (slower; --batched-vjp false skips "
                    "the attempt)", reason=reason)

    combiner = StepGradients(method, params, cfg, dist, scaler=scaler, on_fallback=fallback)
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
            if state.get("last_weights") is not None:
                combiner.last_weights = state["last_weights"].to(model.device)
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
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

    def skip(step: int, cause: str, **fields) -> None:
        """A skipped optimizer step, counted; too many in a row stop the run."""
        nonlocal nan_streak, nan_total
        optimizer.zero_grad(set_to_none=True)
        combiner.reset()
        nan_streak, nan_total = nan_streak + 1, nan_total + 1
        events.emit(NAN, step=step + 1, streak=nan_streak, total=nan_total, cause=cause, **fields)
        if nan_streak >= cfg.max_nan_steps:
            raise TrainingError(
                f"{nan_streak} consecutive steps were skipped (last at step {step + 1}: {cause}); "
                "lower --lr, use --mixed-precision bf16 or no, or check the dataset"
            )

    begin = time.perf_counter()
    for step in range(start, cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        combiner.begin(step)
        # losses, metrics and the finite flag stay on the device until the step's event
        step_losses = torch.zeros(len(names), device=model.device)
        finite, extra = torch.ones((), dtype=torch.bool, device=model.device), {}
        for micro in range(cfg.grad_accum):
            generator = step_generator(cfg.seed, step, micro, dist.rank)
            with out_of_memory_advice("a training step"):
                out = method.losses(method.batch(step, micro), generator)
                values = out.losses.detach().float()
                finite &= torch.isfinite(values).all()
                combiner.backward(out, 1.0 / cfg.grad_accum)
            step_losses += values / cfg.grad_accum
            for key, value in out.metrics.items():
                value = value.detach().float() if torch.is_tensor(value) else float(value)
                extra[key] = extra.get(key, 0.0) + value / cfg.grad_accum
        if not dist.all_true(finite):
            # Skip the whole optimizer step: a partial accumulation would bias the update.
            skip(step, "non-finite loss")
            continue
        with out_of_memory_advice("the fair combination"):
            weights = combiner.finish(step_generator(cfg.seed, step, cfg.grad_accum))
        scaler.unscale_(optimizer)  # fp16: .grad back to true units, inf/NaN found (else no-op)
        grad_norm = _clip(params, cfg.max_grad_norm)
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skips the step if unscale_ found inf/NaN
        scaler.update()
        if scaler.get_scale() < scale:  # the scaler backed off: this step's gradients overflowed
            skip(step, "gradient overflow", loss_scale=scaler.get_scale())
            continue
        nan_streak = 0
        lr_scheduler.step()
        combiner.commit(weights)
        last_weights = weights.float().tolist()
        done = step + 1
        if dist.is_main and (done % cfg.log_every == 0 or done == cfg.steps):
            elapsed = time.perf_counter() - begin
            rate = (done - start) / elapsed if elapsed > 0 else 0.0
            events.emit(
                "progress", step=done, total=cfg.steps,
                losses=dict(zip(names, step_losses.tolist())),
                weights=last_weights, grad_norm=float(grad_norm), lr=lr_scheduler.get_last_lr()[0],
                **({"shares": combiner.shares.float().tolist()} if combiner.shares is not None else {}),
                it_per_s=rate, eta_s=(cfg.steps - done) / rate if rate else None,
                **{k: float(v) for k, v in extra.items()},
            )
        cancel = stop_requested()
        periodic = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
        if dist.is_main and (periodic or cancel) and done < cfg.steps:
            path = save_checkpoint(run_dir, done, {
                "step": done, "trainable": model.trainable.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "weighting": combiner.state_dict(),
                "nan_steps": nan_total, "scaler": scaler.state_dict(),
                "last_weights": None if combiner.last_weights is None else combiner.last_weights.cpu(),
            }, keep=cfg.keep_checkpoints)
            events.emit("checkpoint", step=done, path=str(path))
        if dist.is_main and sampler is not None and cfg.sample_every and done % cfg.sample_every == 0:
            sampler(done)
        if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
            evaluate(done)
        if cancel:
            return {"status": "cancelled", "steps": done, "nan_steps": nan_total, "final_weights": last_weights}
    return {"status": "done", "steps": cfg.steps, "nan_steps": nan_total, "final_weights": last_weights}


def _clip(params, max_norm: float) -> torch.Tensor | float:
    """The combined gradient's norm (a device tensor: read when the event is written)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(grads, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))
