"""Quality, memory and compile measurements for the bench.

Quality is always measured against the uncached baseline images of the same seeds (PSNR, SSIM)
and with the reference classifier (class accuracy, Frechet distance to real data features).
PSNR is :func:`specdiff_fx.demo.psnr` (pooled MSE over all images, range [-1, 1]); SSIM is
scikit-image's ``structural_similarity`` per image (channels last, data range 2), averaged.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from ..quality import psnr


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM of images (B, 3, H, W) in [-1, 1] (clamped) against a reference (scikit-image)."""
    from skimage.metrics import structural_similarity

    a = images.detach().float().clamp(-1, 1).cpu().permute(0, 2, 3, 1).numpy()
    b = reference.detach().float().clamp(-1, 1).cpu().permute(0, 2, 3, 1).numpy()
    values = [structural_similarity(x, y, channel_axis=-1, data_range=2.0) for x, y in zip(a, b)]
    return float(sum(values) / len(values))


def quality(images: torch.Tensor, reference: torch.Tensor | None, labels: torch.Tensor,
            real_features: torch.Tensor, classifier) -> dict:
    """psnr/ssim vs ``reference`` (None for the reference itself), accuracy and FD of ``images``."""
    from ..reference.classifier import classify, features, frechet_distance

    images = images.detach().float().cpu()
    pred = classify(images, classifier)
    out = {
        "psnr": None if reference is None else psnr(images, reference),
        "ssim": None if reference is None else ssim(images, reference),
        "accuracy": float((pred == labels.cpu()).float().mean()),
        "fd": frechet_distance(features(images, classifier), real_features),
    }
    if reference is not None and math.isinf(out["psnr"]):
        out["psnr"] = float("inf")  # identical images (e.g. a cache that never skipped)
    return out


# ----------------------------------------------------------------------------- memory
def peak_memory_mb(fn: Callable[[], object], device: torch.device, held_bytes: int = 0) -> float | None:
    """Peak tensor memory in MiB while ``fn()`` runs.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics: every live
    tensor counts (weights, caches the method keeps between calls, activations).

    CPU: there is no allocator statistic on CPU, and neither tracemalloc (sees only Python's own
    allocator, not tensor storage) nor process RSS (glibc keeps freed pages; compile garbage
    dominates) measure tensors.  So we run ``fn`` under ``torch.profiler`` with
    ``profile_memory=True`` (the CPU allocator reports every allocation and free, Inductor's
    buffers included), take the peak of the running sum of allocated bytes, and add the bytes
    that were already live and are needed by the call: the model's parameters and buffers and
    ``held_bytes`` (cache buffers a method keeps across calls, e.g. our runtime's
    ``cache_bytes``).  Both definitions count the same thing: peak live tensor bytes.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _profiled_peak_bytes(fn)
    return None if peak is None else (peak + held_bytes) / 2**20


def _profiled_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak of the running total of bytes allocated (minus freed) while ``fn`` runs, from the
    allocation events of ``torch.profiler`` (None if this torch does not expose them)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - older/newer torch
        return None
    with _silence_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas: list[tuple[int, int]] = []

    def walk(event) -> None:
        if event.tag == _EventType.Allocation:
            deltas.append((event.start_time_ns, int(event.extra_fields.alloc_size)))
        for child in event.children:
            walk(child)

    try:
        for root in prof.profiler.kineto_results.experimental_event_tree():
            walk(root)
    except AttributeError:  # pragma: no cover
        return None
    deltas.sort(key=lambda d: d[0])
    peak = live = 0
    for _, size in deltas:  # frees of blocks allocated before profiling are not reported
        live += size
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _silence_stderr():
    """The profiler's C++ side prints start/stop lines and an allocator warning on fd 2."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. captured); nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- compiles
class CompileCounter:
    """Counts dynamo recompilations (frames compiled again because a guard failed) and graphs.

    A recompilation is a frame compilation whose ``recompile_reason`` dynamo recorded in its
    compilation metrics (``torch._dynamo.utils.get_compilation_metrics``); graphs are
    ``torch._dynamo.utils.counters["stats"]["unique_graphs"]``.  ``start()`` resets dynamo.
    """

    def start(self) -> None:
        import torch._dynamo
        from torch._dynamo.utils import (
            DEFAULT_COMPILATION_METRICS_LIMIT,
            clear_compilation_metrics,
            counters,
            set_compilation_metrics_limit,
        )

        torch._dynamo.reset()
        clear_compilation_metrics()
        set_compilation_metrics_limit(max(4096, DEFAULT_COMPILATION_METRICS_LIMIT))
        self._graphs0 = counters["stats"]["unique_graphs"]
        self._frames0 = counters["frames"]["ok"]
        self._excluded_recompiles = self._excluded_graphs = 0

    def _recompiles(self) -> int:
        from torch._dynamo.utils import get_compilation_metrics

        return sum(1 for m in get_compilation_metrics() if getattr(m, "recompile_reason", None))

    def _graphs(self) -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"] - self._graphs0

    def recompiles(self) -> int:
        return self._recompiles() - self._excluded_recompiles

    def graphs(self) -> int:
        return self._graphs() - self._excluded_graphs

    @contextlib.contextmanager
    def excluded(self):
        """Compilations inside the block are not counted (the bench's paired baseline).  The block
        may compile one more frame than ``recompile_limit`` allows, so that a row that used up
        the limit does not push the paired baseline into an uncompiled fallback."""
        import torch._dynamo

        r0, g0 = self._recompiles(), self._graphs()
        compiled: dict = {}  # filled when the block ends: {"recompiles": n, "graphs": n}
        try:
            with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit + 1):
                yield compiled
        finally:
            compiled.update(recompiles=self._recompiles() - r0, graphs=self._graphs() - g0)
            self._excluded_recompiles += compiled["recompiles"]
            self._excluded_graphs += compiled["graphs"]


@contextlib.contextmanager
def quiet_logs(*names: str, level: int = 40):
    """Raise the level of some loggers (third-party caches print a lot) for the block."""
    import logging

    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
