"""State across denoiser calls: steps, trajectories, cache buffers, variant choice.

Knows torch only; the backend hands it compiled variants and buffer descriptions.
"""

from .cache_slots import BufferSpec, CacheSlot, CacheSlots
from .runtime import FULL, REUSE, SpecDiffRuntime, warn_fallback
from .schedule import AlwaysFull, FullStepSchedule
from .step_tracker import StepEvent, StepTracker

__all__ = [
    "AlwaysFull", "BufferSpec", "CacheSlot", "CacheSlots", "FULL", "FullStepSchedule",
    "REUSE", "SpecDiffRuntime", "StepEvent", "StepTracker", "warn_fallback",
]
