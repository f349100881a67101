"""State across denoiser calls: steps, trajectories, cache buffers, variant choice.

Knows torch only; the backend hands it compiled variants and buffer descriptions.
"""

from ..buffers import BufferRole, BufferSpec
from .cache_slots import CacheSlot, CacheSlots
from ..variants import DRAFT, FORECAST, FULL, PARTIAL, REUSE
from .forecast_runtime import ForecastRuntime
from .runtime import CachingRuntime, warn_fallback
from .draft import Draft, flow_matching_update
from .pipeline_clock import PipelineClock
from .schedule import AlwaysFull, FullStepSchedule
from .step_tracker import ClockFollower, StepClock, StepEvent, StepTracker
from .token_runtime import TokenRuntime, TokenSlot

__all__ = [
    "FORECAST", "ForecastRuntime",
    "DRAFT", "PARTIAL", "TokenRuntime", "TokenSlot", "flow_matching_update",
    "AlwaysFull", "BufferRole", "BufferSpec", "CacheSlot", "CacheSlots", "FULL", "FullStepSchedule",
    "REUSE", "CachingRuntime", "StepEvent", "StepTracker", "warn_fallback",
    "ClockFollower", "StepClock", "Draft", "PipelineClock",
]
