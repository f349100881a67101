"""Where a runtime's step events come from: one source per runtime, chosen when it is built.

Every caching decision starts from a :class:`~specdiff_fx.runtime.step_tracker.StepEvent`
(trajectory, step, call slot, timestep).  Which object can say it depends on the frame, and
the frame never changes, so the runtime picks its source once (:func:`event_source`) and each
call only asks it:

* :class:`TimestepEvents`, a frame that receives the timestep: the pipeline's clock
  (runtime/pipeline_clock.py) while it runs a trajectory, else the clock inferred from the
  timestep and the latents (runtime/step_tracker.py).  The two number trajectories
  differently, so a change between them drops every cache.  It *leads*: its events are
  published for the frames after a graph break.
* :class:`FollowerEvents`, a frame without the timestep after a graph break: the latest event
  of the frame that has it (``ClockFollower``).
* :class:`BlockEvents`, a block compiled on its own (regional compilation): no timestep and
  no leader, so every event comes from the pipeline's clock, and none outside a trajectory.

A frame with none of them (no timestep, nothing to follow, no pipeline) gets no source and
runs its plain graph.  Knows torch only.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import torch

from .pipeline_clock import PipelineClock
from .step_tracker import ClockFollower, StepClock, StepEvent, StepTracker

log = logging.getLogger("specdiff_fx")


class EventSource:
    """The step events of one runtime's calls.

    ``event(runtime, args)`` is the event of a call with graph inputs ``args`` (None: no step to
    place it in; the runtime then runs the full variant and reads no cache); ``invalidate()``
    makes the next event start a new trajectory; ``name`` is what ``stats()["clock"]`` reports
    (None until the first call); ``leads``: the events are published on the model's
    :class:`StepClock` for frames that follow them."""

    name: str | None = None
    leads = False

    def event(self, runtime: Any, args: Sequence[Any]) -> StepEvent | None:
        raise NotImplementedError

    def invalidate(self) -> None:
        """Nothing to forget by default: the source's events come from outside."""


def read_timestep(value: Any) -> float:
    """A call's timestep input as a float (the first entry of a tensor: one timestep per call)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0])
    return float(value)


class TimestepEvents(EventSource):
    """A frame with the timestep: the pipeline's clock while it runs a trajectory, else inferred."""

    leads = True

    def __init__(self, timestep_index: int, latent_index: int | None = None, direction: str = "auto",
                 pipeline_clock: PipelineClock | None = None) -> None:
        self.timestep_index, self.latent_index = timestep_index, latent_index
        self.pipeline_clock = pipeline_clock
        self.tracker = StepTracker(direction)

    def event(self, runtime: Any, args: Sequence[Any]) -> StepEvent:
        timestep = read_timestep(args[self.timestep_index])
        event = self.pipeline_clock.observe(runtime, timestep) if self.pipeline_clock is not None else None
        source = "pipeline" if event is not None else "inferred"
        if source != self.name:
            if self.name is not None:
                log.info("specdiff: clock source %s -> %s; caches dropped", self.name, source)
                runtime.invalidate()
            self.name = source
        if event is None:
            latents = args[self.latent_index] if self.latent_index is not None else None
            event = self.tracker.observe(timestep, latents if isinstance(latents, torch.Tensor) else None)
            if event.doubt is not None and "doubt" not in runtime._warned:
                runtime._warned.add("doubt")
                warnings.warn(
                    f"specdiff: the clock inferred from timesteps takes this call as the next step ({event.doubt}); "
                    "if a new call starts here (e.g. a refine call right after a full one), call "
                    "get_runtime(model).begin_trajectory() before it, or compile the pipeline with "
                    "specdiff_fx.compile_pipeline(pipe) (docs/pipelines.md)", RuntimeWarning, stacklevel=3)
        return event

    def invalidate(self) -> None:
        self.tracker.invalidate()


class FollowerEvents(EventSource):
    """A frame without the timestep after a graph break: its leader's steps (None: no event of
    that leader to follow, so no cache is read)."""

    def __init__(self, clock: StepClock, leader: object) -> None:
        self.follower = ClockFollower(clock, leader)

    def event(self, runtime: Any, args: Sequence[Any]) -> StepEvent | None:
        self.name = "leader frame"
        return self.follower.event()


class BlockEvents(EventSource):
    """A block compiled on its own: the pipeline's clock, with the scheduler's timestep (None
    outside a trajectory)."""

    def __init__(self, pipeline_clock: PipelineClock) -> None:
        self.pipeline_clock = pipeline_clock

    def event(self, runtime: Any, args: Sequence[Any]) -> StepEvent | None:
        self.name = "pipeline"
        return self.pipeline_clock.observe(runtime, None)


def event_source(*, timestep_index: int | None, latent_index: int | None, direction: str,
                 follow: ClockFollower | None, pipeline_clock: PipelineClock | None):
    """A factory of the source for a frame (each runtime state makes its own), or None for a
    frame with no way to tell steps apart."""
    if follow is not None:
        return lambda: FollowerEvents(follow.clock, follow.leader)
    if timestep_index is not None:
        return lambda: TimestepEvents(timestep_index, latent_index, direction, pipeline_clock)
    if pipeline_clock is not None:
        return lambda: BlockEvents(pipeline_clock)
    return None
