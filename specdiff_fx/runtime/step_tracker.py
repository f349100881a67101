"""Step, trajectory and call-slot detection from what the denoiser receives (the raw path).

Through ``specdiff_fx.compile_pipeline`` the pipeline itself says when a trajectory starts
and when a step ends (runtime/pipeline_clock.py).  A model compiled on its own
(``torch.compile(model, backend=...)``, a user's own loop) has only its inputs to go by, so
this module infers the clock from the timestep and the identity of the latents:

* a timestep that moves against the trajectory's direction starts a new trajectory; one that
  moves with it is the next step;
* an equal timestep with the *same* latents (the same tensor, or equal values) is another
  call of the same step -- a separate cond/uncond pass -- and gets its own cache *slot*;
* the first step change shows how many calls a step makes; past that count, an equal
  timestep with *other* latents is the next step (Heun-type samplers evaluate twice at one
  timestep, PNDM repeats its second one) and the same latents again start a new trajectory;
* before the first step change, *other* latents at the first timestep are a second stream
  (two trajectories run call by call through one model: a slot each), and a third start at
  that timestep shows a series of 1-step calls (a distilled model, t = 1000 each call): from
  then on each such call is a trajectory of its own.  At most ``MAX_CALL_SLOTS`` slots exist
  before the count is known, so memory stays bounded however the model is called;
* ``direction="auto"`` (the default) learns from the first move inside a trajectory whether
  timesteps fall (1000 → 0, most samplers) or rise (Lumina2 passes ``1 − t``).

What the inputs cannot show: a call that starts a new trajectory *below* where the last one
ended, moving the same way (a short refine call right after a full one), looks like more
steps of the old one; after a series of 1-step calls, two trajectories run call by call at
the same timesteps look like one Heun trajectory.  ``docs/pipelines.md`` says so, runtimes warn when the inferred clock
looks wrong, and ``get_runtime(m).begin_trajectory()`` starts one explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_CALL_SLOTS = 4
"""Calls of one step with the same latents told apart before the step's call count is known
(cond, uncond, and a guidance variant or two); a further one starts a new trajectory."""

MAX_STREAMS = 2
"""Calls at a trajectory's first timestep with *other* latents taken as streams of their own
(two trajectories run call by call through one model); a third means 1-step calls."""


@dataclass(frozen=True)
class StepEvent:
    trajectory: int        # 0-based count of trajectories seen
    step: int              # 0-based step within the trajectory
    slot: int              # 0-based call index within the step
    timestep: float
    new_trajectory: bool
    new_step: bool
    skipped: int = 0       # earlier calls now known to have been trajectories of their own
    doubt: str | None = None  # why this step may really start a new trajectory (the raw path's blind spot)


DIRECTIONS = ("down", "up", "auto")


class _Latents:
    """The latents a call received, held by reference: while it is held its memory cannot be
    handed to another tensor, so the same address and version mean the same values."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.version = tensor, tensor._version

    def same_as(self, other: torch.Tensor) -> bool:
        mine = self.tensor
        if other is mine:
            return other._version == self.version
        if other.shape != mine.shape or other.dtype != mine.dtype or other.device != mine.device:
            return False
        if (other.data_ptr() == mine.data_ptr() and other.stride() == mine.stride()
                and other._version == self.version):
            return True
        return bool(torch.equal(other, mine))  # only at an equal timestep: Heun, 1-step series, tests


class StepTracker:
    """``direction``: how the timestep moves along a trajectory: ``"down"`` (1000 → 0, most
    samplers), ``"up"`` (Lumina2's 0 → 1), or ``"auto"`` (learned from the first move)."""

    def __init__(self, direction: str = "auto") -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.direction = direction
        self.reset()

    @property
    def _sign(self) -> float:
        return -1.0 if self.direction == "up" or self._learned == "up" else 1.0

    def reset(self) -> None:
        self._last: float | None = None
        self._latents: _Latents | None = None
        self._calls_this_step = 0
        self._calls_per_step: int | None = None
        self._trajectory = -1
        self._step = 0
        self._learned: str | None = None
        self._streams = 1          # latents seen at the first timestep (each its own slot)
        self._gap: float | None = None  # the trajectory's last non-zero move
        self._repeats = 0
        self._first = 0.0               # the trajectory's first timestep (tracked terms)
        self._series = False       # learned: calls at one timestep with new latents are 1-step calls

    def invalidate(self) -> None:
        """Force the next call to start a new trajectory (e.g. after an input change)."""
        self._last = None
        self._latents = None

    def observe(self, timestep: float, latents: torch.Tensor | None = None) -> StepEvent:
        """The event of a call at ``timestep``; ``latents`` (the call's latent input, if known)
        tells a separate cond/uncond call from a repeated-timestep step."""
        if self.direction == "auto" and self._learned is None and self._trajectory == 0 \
                and self._step == 0 and self._last is not None and timestep != self._last:
            # the first move of the first trajectory says which way timesteps go (until then
            # they are tracked as falling, so ``_last`` is the value as seen)
            self._learned = "down" if timestep < self._last else "up"
            if self._learned == "up":
                self._last = -self._last
        sign = self._sign
        t = sign * timestep  # tracked in "going down" terms
        last = self._last
        same = latents is None or self._latents is None or self._latents.same_as(latents)
        skipped = 0
        if last is None or t > last:
            kind = "trajectory"
        elif t < last:
            kind = "step"
        elif self._calls_per_step is not None:  # the trajectory has moved: a step's calls are known
            if self._calls_this_step < self._calls_per_step:
                kind = "slot"
            else:  # Heun/PNDM evaluate twice at one timestep; the same inputs again restart
                kind = "trajectory" if same else "step"
        elif same:  # still at the first step: a separate cond/uncond call
            kind = "slot" if self._calls_this_step < MAX_CALL_SLOTS else "trajectory"
        elif not self._series and self._streams < MAX_STREAMS:
            # other latents at the first timestep: a second stream (its own slot) -- or the next
            # call of a series of 1-step calls, which the next call tells
            kind = "slot"
            self._streams += 1
        else:
            kind = "trajectory"
            if not self._series:  # a third start at one timestep: 1-step calls, each its own trajectory
                self._series, skipped = True, self._streams - 1
        doubt = None
        if kind == "trajectory":
            self._trajectory += 1 + skipped
            self._step = 0
            self._calls_this_step = 1
            self._calls_per_step = None
            self._streams = 1
            self._gap, self._repeats, self._first = None, 0, t
        elif kind == "step":
            if self._calls_per_step is None:
                self._calls_per_step = self._calls_this_step
            self._step += 1
            self._calls_this_step = 1
            doubt = self._doubt(last - t, t)
        else:
            self._calls_this_step += 1
        self._last = t
        if latents is not None:
            self._latents = _Latents(latents)
        return StepEvent(
            trajectory=self._trajectory,
            step=self._step,
            slot=self._calls_this_step - 1,
            timestep=timestep,
            new_trajectory=kind == "trajectory",
            new_step=kind != "slot",
            skipped=skipped,
            doubt=doubt,
        )

    def _doubt(self, gap: float, t: float) -> str | None:
        """A step that looks like the start of another call: a first repeated timestep late in a
        trajectory (Heun-type samplers repeat from their second timestep on, PNDM its second
        one), or, on a falling schedule, a move far shorter than the one before that does not
        land near the schedule's end (a refine call starting just below where the last ended;
        Karras-type schedules shrink their last moves toward 0)."""
        doubt = None
        if gap == 0 or (self._gap is not None and gap < 1e-3 * self._gap):  # KDPM2A repeats to 1e-6
            if self._repeats == 0 and self._step >= 3:
                doubt = f"step {self._step} repeats the last timestep after {self._step - 1} that did not"
            self._repeats += 1
            return doubt
        if self._gap is not None and gap < self._gap / 2 and self._sign > 0 and t > 0.1 * self._first:
            doubt = f"step {self._step} moves {gap:.4g} after a move of {self._gap:.4g}"
        self._gap = gap
        return doubt


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
    once per block, each call with its own caches).  New trajectories and steps are the ones
    *this follower* sees first: a frame that only runs for some calls of a step (compiled for
    the uncond call's shapes) still counts its own steps."""

    def __init__(self, clock: StepClock, leader: object) -> None:
        self.clock, self.leader = clock, leader
        self._serial = -1
        self._calls = 0
        self._seen: tuple[int, int] | None = None   # (trajectory, step) of the last event read

    def event(self) -> StepEvent | None:
        clock = self.clock
        if clock.event is None or clock.leader is not self.leader:
            return None
        if clock.serial != self._serial:
            self._serial, self._calls = clock.serial, 0
        k = self._calls
        self._calls += 1
        ev = clock.event
        seen, self._seen = self._seen, (ev.trajectory, ev.step)
        return StepEvent(trajectory=ev.trajectory, step=ev.step, slot=ev.slot * 1024 + k, timestep=ev.timestep,
                         new_trajectory=seen is None or seen[0] != ev.trajectory,
                         new_step=seen != (ev.trajectory, ev.step))
