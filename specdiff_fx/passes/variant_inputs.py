"""Description of the runtime-owned buffers a rewritten variant takes as extra inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VariantInput:
    """One extra (static) graph input: its placeholder name, what it holds, and its layout.

    ``role`` tells the runtime what to pass: ``branch_cache`` (a branch output of
    ``branch``), ``kv``, ``history``, ``importance``, ``index``, ``reuse_mask``,
    ``mix_weights``.
    """

    input_name: str
    role: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    branch: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(int(s) for s in self.shape) * torch.empty((), dtype=self.dtype).element_size()
