"""The denoising clock as the pipeline tells it: trajectories, steps and call slots.

A runtime that infers its clock from timesteps (runtime/step_tracker.py) must guess where a
trajectory starts and which calls belong to one step; the pipeline knows.  Every diffusers
pipeline calls ``scheduler.set_timesteps`` before its loop and ``scheduler.step`` after each
model evaluation it consumes, so ``specdiff_fx.compile_pipeline`` reports those two events
here (``begin_trajectory``, ``end_step``) and every runtime of the pipeline's denoisers reads
its events from this one object:

* a trajectory starts at ``begin_trajectory``;
* a step ends at ``end_step`` (Heun-type schedulers step after each of their two
  evaluations: each is a step, as the scheduler counts it);
* the calls a runtime gets between two step ends are that step's call slots 0, 1, … (separate
  cond/uncond passes, "true CFG").

Steps are counted per runtime from its first call in the trajectory, so a denoiser that joins
a trajectory late (the second expert of Wan 2.2, a graph compiled mid-trajectory for a call of
another shape) starts with its own warm-up instead of reading caches it never wrote.

A step the scheduler takes with no runtime's call in it means the denoiser ran outside every
compiled graph -- dynamo's recompile limit reached (past it, a frame runs eagerly with no sign
but one log line), or an eager stance -- so nothing was cached: the clock warns once and counts
such steps (``uncompiled_steps``, shown by ``report()``).

The clock also lends the pipeline's sampler to the self-speculative draft (``draft``, a
:class:`~specdiff_fx.runtime.draft.Draft` that compile_pipeline builds from a copy of the
pipeline's scheduler set to a few steps), so the draft advances as the pipeline does instead
of assuming one (runtime/draft.py).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Callable

from .draft import Draft
from .step_tracker import MAX_CALL_SLOTS, StepEvent

log = logging.getLogger(__name__)


class _User:
    __slots__ = ("trajectory", "index", "first_step", "step", "calls")

    def __init__(self) -> None:
        self.trajectory = -1   # the clock's trajectory this runtime last ran in
        self.index = -1        # this runtime's own count of trajectories
        self.first_step = 0
        self.step = -1
        self.calls = 0


class PipelineClock:
    """Trajectory and step events reported by a pipeline, read by every runtime of its
    denoisers.  ``draft_source(steps)`` (set by compile_pipeline) builds a :class:`Draft`."""

    def __init__(self) -> None:
        self.trajectory = -1
        self.step = 0
        self.stopped = False
        self.draft_source: Callable[[int], Draft | None] | None = None
        # called before each runtime reads the clock: compile_pipeline re-attaches to a scheduler
        # the user swapped in (``pipe.scheduler = ...``) and begins the trajectory it missed
        self.before_call: Callable[[], None] | None = None
        # the timestep of the clock's current step (compile_pipeline reads the scheduler's list):
        # what a block frame, which receives no timestep, reports in its events
        self.timestep_source: Callable[[], float | None] | None = None
        # steps the scheduler took with no call reaching a compiled graph (module docstring)
        self.uncompiled_steps = 0
        self._reached = False
        self._warned = False
        self._users: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ---------------------------------------------------------------- pipeline side
    def begin_trajectory(self) -> None:
        self.stopped = False
        self.trajectory += 1
        self.step = 0
        self._reached = False
        log.debug("pipeline clock: trajectory %d begins", self.trajectory)

    def stop(self) -> None:
        """No trajectory runs until the next :meth:`begin_trajectory` (the pipeline let go of
        this clock): frames that read it get no event and never read a cache.  The trajectory
        count goes on, so no later trajectory shares a number with an earlier one."""
        self.stopped = True

    def end_step(self) -> None:
        if self.running:
            if not self._reached:
                self._uncompiled_step()
            self._reached = False
        if self.trajectory >= 0:
            self.step += 1

    def reached(self) -> None:
        """A call reached a compiled graph (any runtime, caching or not) in this step."""
        self._reached = True

    def _uncompiled_step(self) -> None:
        """The scheduler stepped and no denoiser call reached a compiled graph: dynamo ran the
        denoiser itself, uncompiled and uncached.  Said once, counted always."""
        self.uncompiled_steps += 1
        if self._warned:
            return
        self._warned = True
        log.info("pipeline clock: step %d of trajectory %d ran no compiled graph", self.step, self.trajectory)
        warnings.warn(
            "specdiff: the pipeline stepped its scheduler without the denoiser reaching its compiled graph, so "
            "dynamo ran it uncompiled and uncached: its recompile limit was reached (torch._dynamo.config."
            "recompile_limit graphs per code object; with dynamic=False every new image size, batch size, frame "
            "count or text length is a graph of its own), or the model runs eagerly (torch.compiler.set_stance, "
            "torch._dynamo.disable).  get_runtime(model).report() counts these steps", RuntimeWarning, stacklevel=4)

    # ---------------------------------------------------------------- runtime side
    @property
    def running(self) -> bool:
        """A trajectory has begun: events come from the pipeline."""
        return self.trajectory >= 0 and not self.stopped

    def current_timestep(self) -> float:
        """The scheduler's timestep at the current step, NaN where it cannot tell."""
        try:
            t = self.timestep_source() if self.timestep_source is not None else None
        except Exception:  # a scheduler without a timestep list we can read
            t = None
        return float("nan") if t is None else float(t)

    def observe(self, user: object, timestep: float | None) -> StepEvent | None:
        """The event of ``user``'s call (one runtime); None when the pipeline has not begun a
        trajectory or the call is one more than a step can have (the caller then infers the
        clock from the inputs instead).  ``timestep`` None (a block frame, which receives
        none): the scheduler's, :meth:`current_timestep`."""
        if self.before_call is not None:
            self.before_call()
        if not self.running:
            return None
        state = self._users.get(user)
        if state is None:
            state = self._users[user] = _User()
        new_trajectory = state.trajectory != self.trajectory
        new_step = new_trajectory or state.step != self.step
        if new_trajectory:
            state.trajectory, state.first_step = self.trajectory, self.step
            state.index += 1
        if new_step:
            state.step, state.calls = self.step, 0
        if state.calls >= 2 * MAX_CALL_SLOTS:
            # scheduler.step is not being called (a loop of the user's own around a pipeline
            # component): do not grow slots without bound
            return None
        state.calls += 1
        if timestep is None:
            timestep = self.current_timestep()
        return StepEvent(trajectory=state.index, step=self.step - state.first_step, slot=state.calls - 1,
                         timestep=timestep, new_trajectory=new_trajectory, new_step=new_step)

    def draft(self, steps: int) -> Draft | None:
        return self.draft_source(steps) if self.draft_source is not None else None
