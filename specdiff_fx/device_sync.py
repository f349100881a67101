"""Waiting for the device before and after a timed region.

Why it exists: CUDA runs kernels asynchronously, so a wall-clock timing (the demo, the benches)
must wait for the queued work at both ends of what it times.  One function for every timer,
and on CPU (or without CUDA) it does nothing.

Imports torch only, so every layer may use it (runtime/ included).
"""

from __future__ import annotations

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for every kernel queued on ``device`` when it is a CUDA device (None: the current
    CUDA device, if CUDA is available); nothing for any other device."""
    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
