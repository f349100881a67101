"""Small host-computed values (forecast coefficients, mixing weights) written into device buffers.

Why a helper: ``cuda_buffer.copy_(torch.tensor([...]))`` copies from pageable memory, which
blocks the host until the GPU has drained its queue, once per step.  Staging the values in
pinned memory and copying with ``non_blocking=True`` queues the copy behind the previous
step's kernels instead.  Reusing a pinned block is safe: torch's caching host allocator
does not hand a block out again until the copy that read it has completed.
"""

from __future__ import annotations

from typing import Sequence

import torch


def write_values(dst: torch.Tensor, values: Sequence[float] | torch.Tensor) -> None:
    """``dst.copy_(values)`` without a host sync on CUDA."""
    src = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dst.dtype)
    if dst.is_cuda and src.device.type == "cpu":
        if not src.is_pinned():
            src = src.pin_memory()
        dst.copy_(src, non_blocking=True)
    else:
        dst.copy_(src)
