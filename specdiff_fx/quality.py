"""Image quality numbers the library itself decides by.

``tune`` picks a configuration by PSNR against the uncached outputs, and the demo and the bench
report the same number: one definition, at the library's level, so that the library never
imports its tools (``bench/``, the demo) to compute it.
"""

from __future__ import annotations

import torch


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of images in [-1, 1] (clamped) against a reference."""
    mse = torch.mean((images.clamp(-1, 1) - reference.clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()
