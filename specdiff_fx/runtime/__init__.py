"""State across denoiser calls: steps, trajectories, cache buffers, variant choice.

Knows torch only; the backend hands it compiled variants and buffer descriptions.

* ``runtime.py``: :class:`CachingRuntime`, the callable dynamo gets back for one graph and the
  base of every policy's runtime (``ForecastRuntime`` for taylor/sandwich, ``TokenRuntime``
  for specdiff); ``runtime.buffers_for(variant, slot)`` is what a variant is called with.
* ``slots.py``: :class:`SlotState`, one per call slot: buffers found by their ``BufferSpec``,
  the trajectory stamp, the policy's own state.
* ``events.py``: :class:`EventSource`, where a runtime's step events come from, chosen once
  (``pipeline_clock.py``, ``step_tracker.py`` are the clocks behind it).
* ``draft.py``: the samplers of specdiff's self-speculative draft.
"""

from ..buffers import BufferRole, BufferSpec
from ..variants import DRAFT, FORECAST, FULL, PARTIAL, REUSE
from .draft import Draft, flow_matching_update
from .events import BlockEvents, EventSource, FollowerEvents, TimestepEvents
from .forecast_runtime import ForecastRuntime, ForecastSlotState
from .pipeline_clock import PipelineClock
from .runtime import CachingRuntime, warn_fallback
from .schedule import AlwaysFull, FullStepSchedule
from .slots import Slots, SlotState
from .step_tracker import ClockFollower, StepClock, StepEvent, StepTracker
from .token_runtime import TokenRuntime, TokenSlotState

__all__ = [
    "DRAFT", "FORECAST", "FULL", "PARTIAL", "REUSE",
    "CachingRuntime", "ForecastRuntime", "TokenRuntime", "warn_fallback",
    "SlotState", "Slots", "ForecastSlotState", "TokenSlotState",
    "EventSource", "TimestepEvents", "FollowerEvents", "BlockEvents",
    "ClockFollower", "PipelineClock", "StepClock", "StepEvent", "StepTracker",
    "Draft", "flow_matching_update",
    "AlwaysFull", "BufferRole", "BufferSpec", "FullStepSchedule",
]
