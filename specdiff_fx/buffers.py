"""One description of a runtime-owned buffer, shared by the passes, the runtime and inspect.

A rewritten variant takes extra static inputs (caches, the history ring, scores, weights):
the passes describe them as they add the placeholders, the runtime allocates and hands them
over in that order, and inspect reports their shapes and memory.  One type for all three
means no field-by-field conversion between layers, and the runtime learns what a buffer
holds from its ``role`` and ``ring`` position, never by parsing its name.

Imports torch and the standard library only: ``passes`` and ``runtime`` both import it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch


RING = 3
"""Entries of the history ring of exit features (newest first).  A variant writes the oldest,
``RING - 1`` (:data:`RING_WRITE`); the runtime then rotates it to the front."""
RING_WRITE = RING - 1


class BufferRole(str, enum.Enum):
    """What a buffer holds, which tells the runtime what to pass for it.

    Values are the strings the roles always had: ``spec.role == "kv"`` holds and JSON
    output is unchanged.
    """

    # branch level (passes/branch_cache_variants.py, passes/forecast_variants.py)
    BRANCH_CACHE = "branch_cache"      # a branch's output at the last full step
    TAYLOR_TERM = "taylor_term"        # F, D1, D2 of one forecast target
    TAYLOR_COEF = "taylor_coef"        # [c0, c1, a1, a2]
    FORECAST_ERROR = "forecast_error"  # the probe's error estimate
    # token level (passes/token_variants.py, token_select.py, token_forecast.py)
    KV = "kv"                          # one attention site's keys or values
    HISTORY = "history"                # one entry of the ring of exit features
    IMPORTANCE = "importance"          # attention each image token received
    INDEX = "index"                    # the computed subset's token positions
    REUSE_MASK = "reuse_mask"          # tokens reused as is (C2)
    MIX_WEIGHTS = "mix_weights"        # weights of the history ring (C3)
    HIS = "his"                        # importance at the last full step
    FUT = "fut"                        # the draft's importance at this timestep
    COUNT = "count"                    # steps each token has gone uncomputed
    # token lines (passes/token_lines.py)
    LINE = "line"                      # [x, valid, horizon], written before each call
    LINE_VALUE = "line_value"          # each token's residual at its last computation
    LINE_SLOPE = "line_slope"          # first divided difference per entry (tokens, or a K/V cache's)
    LINE_STAMP = "line_stamp"          # where each token was last computed

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class BufferSpec:
    """One extra graph input: its placeholder name, what it holds, and its layout.

    ``branch``: the residual branch (or chain) a branch-level buffer belongs to.
    ``ring``: for history buffers, the position in the ring of exit features it is
    (0 newest; the entry a variant writes is 2, the oldest, which the runtime then
    rotates to the front).
    """

    name: str
    role: BufferRole
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    branch: str = ""
    ring: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.role, BufferRole):
            try:
                role = BufferRole(self.role)
            except ValueError:
                known = ", ".join(r.value for r in BufferRole)
                raise ValueError(f"buffer {self.name!r}: unknown role {self.role!r} (known: {known})") from None
            object.__setattr__(self, "role", role)
        if (self.role == BufferRole.HISTORY) != (self.ring is not None):
            raise ValueError(f"buffer {self.name!r}: a ring position goes with role 'history' and only "
                             f"with it (role {self.role.value!r}, ring {self.ring!r})")

    @property
    def nbytes(self) -> int:
        return math.prod(int(s) for s in self.shape) * torch.empty((), dtype=self.dtype).element_size()
