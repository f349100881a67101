"""Step, trajectory and call-slot detection from the timestep the denoiser receives.

A sampler calls the denoiser once or more per step with a timestep that only goes
down along a trajectory.  So: a timestep above the last one starts a new trajectory; a
lower one is the next step; an equal one is another call within the same step (separate
cond/uncond passes), which gets its own cache *slot*.  Once the first step change shows
how many calls a step makes, an extra call at an equal timestep can only be a new
trajectory that starts where the last one did, and is treated as one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepEvent:
    trajectory: int        # 0-based count of trajectories seen
    step: int              # 0-based step within the trajectory
    slot: int              # 0-based call index within the step
    timestep: float
    new_trajectory: bool
    new_step: bool


class StepTracker:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._last: float | None = None
        self._calls_this_step = 0
        self._calls_per_step: int | None = None
        self._trajectory = -1
        self._step = 0

    def invalidate(self) -> None:
        """Force the next call to start a new trajectory (e.g. after an input change)."""
        self._last = None

    def observe(self, timestep: float) -> StepEvent:
        last = self._last
        new_trajectory = (
            last is None
            or timestep > last
            or (timestep == last and self._calls_per_step is not None
                and self._calls_this_step >= self._calls_per_step)
        )
        if new_trajectory:
            self._trajectory += 1
            self._step = 0
            self._calls_this_step = 1
            self._calls_per_step = None
            new_step = True
        elif timestep == last:
            self._calls_this_step += 1
            new_step = False
        else:
            if self._calls_per_step is None:
                self._calls_per_step = self._calls_this_step
            self._step += 1
            self._calls_this_step = 1
            new_step = True
        self._last = timestep
        return StepEvent(
            trajectory=self._trajectory,
            step=self._step,
            slot=self._calls_this_step - 1,
            timestep=timestep,
            new_trajectory=new_trajectory,
            new_step=new_step,
        )
