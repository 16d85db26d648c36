"""Measuring tools shared by the benchmarks: medians of timed repeats, and the peak of live
tensor memory.

CPU PyTorch keeps no allocator statistics, so ``TensorMemory`` counts it itself: a dispatch mode
sees every tensor an operator creates (forward and backward, autograd's saved tensors included),
adds its storage's bytes once, and subtracts them when the storage is freed. The peak is of
bytes held by tensors created inside the block, on top of what existed before (the model's
weights). On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.
"""
from __future__ import annotations

import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage.data_ptr()
        if key == 0 or key in self._seen:
            return
        size = storage.nbytes()
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)

        def release(key=key, size=size, mode=weakref.ref(self)):
            owner = mode()
            if owner is not None and key in owner._seen:
                owner._seen.discard(key)
                owner.live -= size

        weakref.finalize(storage, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out


def peak_bytes(fn, device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors alive during ``fn()`` beyond those alive before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with TensorMemory() as meter:
        fn()
    return meter.peak


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2, device="cpu") -> dict[str, float]:
    """Medians for several functions timed in turn, round after round, so slow drifts of a
    noisy machine hit all of them alike."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"
