"""Runtime-owned cache buffers, one set per call slot, stamped with the trajectory that wrote them.

A read is allowed only if the slot was written in the *current* trajectory: that stamp is
what makes a stale read (another trajectory, a previous input signature) impossible.
"""

from __future__ import annotations

import torch

from ..buffers import BufferSpec


class CacheSlot:
    def __init__(self, specs: list[BufferSpec]) -> None:
        self.buffers = [torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in specs]
        self.trajectory: int | None = None
        self.step: int | None = None

    def valid_for(self, trajectory: int) -> bool:
        return self.trajectory is not None and self.trajectory == trajectory

    def stamp(self, trajectory: int, step: int) -> None:
        self.trajectory, self.step = trajectory, step

    def invalidate(self) -> None:
        self.trajectory = self.step = None


class CacheSlots:
    """Buffers for each call slot of a step (cond and uncond passes made as separate calls)."""

    def __init__(self, specs: list[BufferSpec]) -> None:
        self.specs = list(specs)
        self._slots: dict[int, CacheSlot] = {}

    def __getitem__(self, slot: int) -> CacheSlot:
        if slot not in self._slots:
            self._slots[slot] = CacheSlot(self.specs)
        return self._slots[slot]

    def clear(self) -> None:
        self._slots.clear()

    @property
    def bytes_per_slot(self) -> int:
        return sum(s.nbytes for s in self.specs)

    @property
    def allocated_bytes(self) -> int:
        return self.bytes_per_slot * len(self._slots)
