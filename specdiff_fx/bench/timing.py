"""Timing helpers of the benches: per-call milliseconds of several functions timed round-robin,
and peak memory of one call.

Round-robin (every function once per round, ``repeats`` rounds) puts a slow spell of a shared
machine on every function alike, so ratios between them hold where absolute times drift.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..device_sync import synchronize as _sync

def time_round_robin(fns: dict[str, Callable[[], Any]], *, repeats: int, calls: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Per-call milliseconds of each function, ``repeats`` rounds, all functions in each round."""
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        _sync(device)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                _sync(device)
                times[name].append((time.perf_counter() - start) * 1000.0 / calls)
    return times


def peak_memory_mb(fn: Callable[[], Any], device: torch.device, held_bytes: int) -> float | None:
    from .metrics import peak_memory_mb as measure

    with torch.no_grad():
        return measure(fn, device, held_bytes=held_bytes)


def new_step(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` as a new CUDA-graph step each call (cudagraph trees free the last step's outputs)."""
    def call():
        torch.compiler.cudagraph_mark_step_begin()
        return fn()
    return call
