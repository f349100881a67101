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


DIRECTIONS = ("down", "up")


class StepTracker:
    """``direction``: how the timestep moves along a trajectory, ``"down"`` (1000 → 0, most
    samplers) or ``"up"`` (Lumina2's 0 → 1): a move the other way starts a new trajectory."""

    def __init__(self, direction: str = "down") -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self._sign = 1.0 if direction == "down" else -1.0
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
        timestep_seen, timestep = timestep, self._sign * timestep  # track in "going down" terms
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
            timestep=timestep_seen,
            new_trajectory=new_trajectory,
            new_step=new_step,
        )


class StepClock:
    """The steps of one model, shared by every graph a backend compiles for it.

    When diffusers code breaks the graph (``.tolist()``, ``.item()``), the blocks run in a frame
    that never receives the timestep.  The frame that has it (the *leader*) publishes each step
    event here; a frame without it (a *follower*) reads the event of the call it is part of, so
    both agree on step, trajectory and call slot.  A follower bound to one leader never follows
    another (a second model compiled with the same backend): it then runs full steps only.
    """

    def __init__(self) -> None:
        self.leader: object | None = None
        self.event: StepEvent | None = None
        self.serial = 0

    def publish(self, leader: object, event: StepEvent) -> None:
        self.leader, self.event = leader, event
        self.serial += 1


class ClockFollower:
    """A follower's view of a :class:`StepClock`: the leader's latest event, with the call
    slot extended by how many times this follower ran within that event (a frame may run
    once per block, each call with its own caches)."""

    def __init__(self, clock: StepClock, leader: object) -> None:
        self.clock, self.leader = clock, leader
        self._serial = -1
        self._calls = 0

    def event(self) -> StepEvent | None:
        clock = self.clock
        if clock.event is None or clock.leader is not self.leader:
            return None
        if clock.serial != self._serial:
            self._serial, self._calls = clock.serial, 0
        k = self._calls
        self._calls += 1
        ev = clock.event
        return StepEvent(trajectory=ev.trajectory, step=ev.step, slot=ev.slot * 1024 + k, timestep=ev.timestep,
                         new_trajectory=ev.new_trajectory and k == 0, new_step=ev.new_step and k == 0)
