"""The one training loop, shared by every method.

Per optimizer step: ``grad_accum`` micro-batches, each giving K objective losses; the method's
``combine`` decides how they become a gradient — "fair" hands them to the engine's fair
combination (per-objective gradients, Gramian, weighting, d = Σ w_i g_i into ``.grad``), "sum"
does one backward of a fixed weighted sum. Then clipping of the combined gradient, the optimizer
and the LR schedule.

Exact resume: the noise and timesteps of a step come from a generator seeded by (seed, step) and
the data order is a pure function of (seed, step), so a checkpoint needs only the trained tensors,
the optimizer, the LR scheduler, the combiner's state and a few counters (``TrainingState``) — and
a resumed run continues bit for bit on the CPU.

Several processes (accelerate launch): the UNet is *not* wrapped in DDP — the fair combination
needs the per-objective gradients, which DDP's hooks would sum away. Each rank computes its own
gradients and they are averaged with explicit all-reduces (per objective before the Gramian,
so every rank solves the same weights), which is what DDP would do for a plain sum.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.combine import is_out_of_memory
from core.fileio import CHECKPOINT, EVAL, NAN, PROGRESS, RESUME, WARNING, EventLog

from .methods.base import Method
from .training_state import TrainingState


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


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """Noise and timesteps of micro-batch ``micro`` of the global batch of ``step`` (the index
    counts over every process's micro-batches), a function of its coordinates alone."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 131 + micro) * 1009)


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
        """Whether ``flag`` (a bool or a 0-dim tensor) holds on every process (so all skip, step
        or stop together). A host read: the loop makes two per step (finite losses, no cancel)."""
        if not self.active:
            return bool(flag)
        value = torch.as_tensor(flag).to(self.device, torch.float32).reshape(1)
        self.dist.all_reduce(value, op=self.dist.ReduceOp.MIN)
        return bool(value.item() > 0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class StepGradients:
    """Turns each micro-batch's K losses into gradients and completes ``.grad`` for the optimizer
    step: the fair combiner (``core.combine.FairCombiner``, which owns the ``--fair-every``
    schedule and its checkpoint state) or one backward of the method's fixed weighted sum, with
    the GradScaler's and the processes' glue around either."""

    def __init__(self, method: Method, params: list[torch.Tensor], cfg, dist: Distributed,
                 scaler: torch.amp.GradScaler | None = None, on_fallback=None):
        self.method, self.params, self.dist = method, params, dist
        # fp16: losses scaled by the GradScaler's scale; disabled (pass-through) otherwise
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        self.weighting = self.fair = None
        if method.combine == "fair":
            from core.combine import FairCombiner
            from core.weighting import get_weighting

            self.weighting = get_weighting(cfg.weighting, len(method.objective_names), **(cfg.weighting_options or {}))
            self.fair = FairCombiner(params, self.weighting, len(method.objective_names),
                                     reduce=dist.average if dist.active else None, batched=cfg.batched_vjp,
                                     on_fallback=on_fallback, match_norm=getattr(cfg, "match_norm", False),
                                     every=getattr(cfg, "fair_every", 1))

    def extra_parameters(self) -> list[torch.Tensor]:
        return self.weighting.parameters() if self.weighting is not None else []

    @property
    def shares(self) -> torch.Tensor | None:
        """Each objective's share of this step's update (a step that solved fair weights)."""
        return self.fair.shares if self.fair is not None else None

    def _loss_scale(self, device) -> torch.Tensor | float:
        """The scaler's scale as a tensor on ``device`` (no host read), or 1."""
        return self.scaler.scale(torch.ones((), device=device)) if self.scaler.is_enabled() else 1.0

    def begin(self, step: int) -> None:
        if self.fair is not None:
            self.fair.begin(step)

    def backward(self, out, scale: float) -> None:
        losses = self.scaler.scale(out.losses * scale)
        if self.fair is not None:
            solving = self.fair.solving
            self.fair.backward(losses, out.active, loss_scale=self._loss_scale(losses.device) if solving else 1.0)
        else:
            weights = self.method.sum_weights().to(losses)
            (losses * weights).sum().backward()

    def reset(self) -> None:
        if self.fair is not None:
            self.fair.reset()

    def finish(self, generator: torch.Generator) -> torch.Tensor:
        """``.grad`` of the step (in the scaler's scaled domain, for ``scaler.unscale_``) and
        the weights used (on the device)."""
        if self.fair is None:  # a plain sum: average the gradient over processes, as DDP would
            self.dist.average([p.grad for p in self.params if p.grad is not None])
            return self.method.sum_weights()
        weights = self.fair.finish(generator)
        if self.fair.solved is not None and self.scaler.is_enabled():
            for p in self.extra_parameters():  # a weighting sets its parameters' .grad unscaled
                if p.grad is not None:
                    p.grad.mul_(self._loss_scale(p.grad.device))
        return weights

    def commit(self) -> None:
        """The step was applied (see ``FairCombiner.commit``)."""
        if self.fair is not None:
            self.fair.commit()

    def state_dict(self) -> dict:
        return self.fair.state_dict() if self.fair is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.fair is not None:
            self.fair.load_state_dict(state)


def train(cfg, method: Method, run_dir: Path, events: EventLog, *, resume: bool = False,
          after_step=None, stop_requested=lambda: False) -> dict:
    """Run (or resume) the optimization. Returns a summary for the LoRA metadata.

    ``after_step(step)`` is called on the main process after every applied step, once its
    checkpoint (if any) is written: it decides itself which steps it renders samples or validates
    at. ``stop_requested()`` is polled after every step (a cancelled job): the loop then saves a
    checkpoint and returns with "cancelled".
    """
    loop = TrainingLoop(cfg, method, Path(run_dir), events)
    if resume:
        loop.resume()
    return loop.run(after_step, stop_requested)


@dataclass
class StepResult:
    """An applied optimizer step, its figures still on the device until an event reads them."""
    weights: torch.Tensor
    losses: torch.Tensor
    grad_norm: torch.Tensor | float
    metrics: dict


class TrainingLoop:
    """One run's objects (the ``TrainingState`` a checkpoint keeps, the step gradients) and the
    step, the events and the checkpoints around them."""

    def __init__(self, cfg, method: Method, run_dir: Path, events: EventLog):
        from diffusers.optimization import get_scheduler

        self.cfg, self.method, self.run_dir, self.events = cfg, method, run_dir, events
        self.dist = Distributed()
        method.rank, method.world = self.dist.rank, self.dist.world
        self.params = method.model.trainable.parameters()
        scaler = method.model.precision.make_scaler()  # fp16 only; a pass-through otherwise
        self.gradients = StepGradients(method, self.params, cfg, self.dist, scaler=scaler, on_fallback=self._fallback)
        optimizer = make_optimizer(cfg, self.params + self.gradients.extra_parameters())
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                     num_training_steps=cfg.steps)
        self.state = TrainingState(method.model.trainable, optimizer, lr_scheduler, self.gradients, scaler)
        self.names = list(method.objective_names)
        self.nan_streak = 0

    def _fallback(self, reason: str) -> None:
        self.events.emit(WARNING, message="the batched vector-Jacobian product is not supported by an operator of "
                         "this model; using K backward passes from now on (slower; --batched-vjp false skips "
                         "the attempt)", reason=reason)

    def resume(self) -> None:
        path = self.state.restore(self.run_dir)
        if path is not None:
            self.events.emit(RESUME, step=self.state.step, checkpoint=str(path))

    def evaluate(self, done: int) -> None:
        if self.dist.is_main:
            values = self.method.evaluate()
            if values:
                self.events.emit(EVAL, step=done, **values)

    def skip(self, step: int, cause: str, **fields) -> None:
        """A skipped optimizer step, counted; too many in a row stop the run."""
        self.state.optimizer.zero_grad(set_to_none=True)
        self.gradients.reset()
        self.nan_streak += 1
        self.state.nan_steps += 1
        self.events.emit(NAN, step=step + 1, streak=self.nan_streak, total=self.state.nan_steps, cause=cause, **fields)
        if self.nan_streak >= self.cfg.max_nan_steps:
            raise TrainingError(
                f"{self.nan_streak} consecutive steps were skipped (last at step {step + 1}: {cause}); "
                "lower --lr, use --mixed-precision bf16 or no, or check the dataset"
            )

    def step(self, step: int) -> StepResult | None:
        """One optimizer step: its micro-batches, the combined gradient, clipping, the optimizer
        and the LR schedule; None when it was skipped."""
        cfg, method, state, gradients = self.cfg, self.method, self.state, self.gradients
        state.optimizer.zero_grad(set_to_none=True)
        gradients.begin(step)
        # losses, metrics and the finite flag stay on the device until the step's event
        device = method.model.device
        step_losses = torch.zeros(len(self.names), device=device)
        finite, metrics = torch.ones((), dtype=torch.bool, device=device), {}
        for micro in range(cfg.grad_accum):
            # by the micro-batch's index in the global batch, so P processes at grad_accum A draw
            # the noise one process draws at P x A (the data order follows the same index)
            generator = step_generator(cfg.seed, step, micro * self.dist.world + self.dist.rank)
            with out_of_memory_advice("a training step"):
                out = method.losses(method.batch(step, micro), generator)
                values = out.losses.detach().float()
                finite &= torch.isfinite(values).all()
                gradients.backward(out, 1.0 / cfg.grad_accum)
            step_losses += values / cfg.grad_accum
            for key, value in out.metrics.items():
                value = value.detach().float() if torch.is_tensor(value) else float(value)
                metrics[key] = metrics.get(key, 0.0) + value / cfg.grad_accum
        if not self.dist.all_true(finite):
            # Skip the whole optimizer step: a partial accumulation would bias the update.
            self.skip(step, "non-finite loss")
            return None
        with out_of_memory_advice("the fair combination"):
            weights = gradients.finish(step_generator(cfg.seed, step, cfg.grad_accum * self.dist.world))
        scaler = state.scaler
        scaler.unscale_(state.optimizer)  # fp16: .grad back to true units, inf/NaN found (else no-op)
        grad_norm = _clip(self.params, cfg.max_grad_norm)
        scale = scaler.get_scale()
        scaler.step(state.optimizer)  # skips the step if unscale_ found inf/NaN
        scaler.update()
        if scaler.get_scale() < scale:  # the scaler backed off: this step's gradients overflowed
            self.skip(step, "gradient overflow", loss_scale=scaler.get_scale())
            return None
        self.nan_streak = 0
        state.lr_scheduler.step()
        gradients.commit()
        state.step = step + 1
        return StepResult(weights, step_losses, grad_norm, metrics)

    def log(self, result: StepResult, start: int, begin: float) -> None:
        done, total = self.state.step, self.cfg.steps
        elapsed = time.perf_counter() - begin
        rate = (done - start) / elapsed if elapsed > 0 else 0.0
        shares = self.gradients.shares
        self.events.emit(
            PROGRESS, step=done, total=total, losses=dict(zip(self.names, result.losses.tolist())),
            weights=result.weights.float().tolist(), grad_norm=float(result.grad_norm),
            lr=self.state.lr_scheduler.get_last_lr()[0],
            **({"shares": shares.float().tolist()} if shares is not None else {}),
            it_per_s=rate, eta_s=(total - done) / rate if rate else None,
            **{k: float(v) for k, v in result.metrics.items()},
        )

    def run(self, after_step=None, stop_requested=lambda: False) -> dict:
        cfg, state, is_main = self.cfg, self.state, self.dist.is_main
        start = state.step
        if start == 0:
            self.evaluate(0)
        last = None  # the last applied step's weights
        begin = time.perf_counter()
        for step in range(start, cfg.steps):
            result = self.step(step)
            if result is None:
                continue
            last, done = result.weights, state.step
            if is_main and (done % cfg.log_every == 0 or done == cfg.steps):
                self.log(result, start, begin)
            # a cancel seen by any process stops every one (else the others wait in a collective)
            cancel = not self.dist.all_true(not stop_requested())
            periodic = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            if is_main and (periodic or cancel) and done < cfg.steps:
                path = state.save(self.run_dir, keep=cfg.keep_checkpoints)
                self.events.emit(CHECKPOINT, step=done, path=str(path))
            if is_main and after_step is not None:
                after_step(done)
            if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
                self.evaluate(done)
            if cancel:
                return self.summary("cancelled", last)
        return self.summary("done", last)

    def summary(self, status: str, weights: torch.Tensor | None) -> dict:
        return {"status": status, "steps": self.state.step if status == "cancelled" else self.cfg.steps,
                "nan_steps": self.state.nan_steps,
                "final_weights": None if weights is None else weights.float().tolist()}


def _clip(params, max_norm: float) -> torch.Tensor | float:
    """The combined gradient's norm (a device tensor: read when the event is written)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(grads, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))
