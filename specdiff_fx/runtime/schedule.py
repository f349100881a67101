"""Which steps of a trajectory run the full graph, a partial (token) step, or a cached step.

One schedule object serves every policy.  Full steps: the first ``warmup_steps``, every
``interval``-th step after them, and ``reset_steps``.  The steps in between are *cached*
(fora: reuse, taylor: forecast); with ``partial_every`` (specdiff) every ``partial_every``-th
of them, counted from the last full step, is a *partial* step that computes the most important
tokens and corrects their forecast, and the others are cached (specdiff: all tokens
forecast).  A runtime may still make a step full on its own (a new trajectory, a cache
that is not valid, a forecast-error estimate over its tolerance).

Step indices mean different things at different step counts: step 13 is the middle of a
28-step trajectory and a quarter of a 50-step one, so a schedule tuned at 28 steps and written
in indices forecasts half of a 50-step trajectory from its 13th step.  ``full_at`` places full
steps in the sampler's own time instead: *progress* through the noise schedule, 0 at pure noise
and 1 at the clean sample, read from the timestep each call receives (:func:`progress`).  A
point ``u`` makes full the first step whose progress reaches it, whatever the step count, the
scheduler's spacing or shift, or an img2img strength that starts the trajectory part-way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FULL_STEP, PARTIAL_STEP, CACHED_STEP = "full", "partial", "cached"
PROGRESS_EPS = 1e-6  # a point a step's progress reaches up to float rounding still counts as reached


def progress(timestep: float, first_timestep: float, rising: bool) -> float:
    """How far a trajectory is through its noise schedule, in [0, 1], from the timestep the
    model receives.  Timesteps are on the 0..1000 scale (the schedulers' ``num_train_timesteps``)
    unless the trajectory's first one is at most 1 (FLUX's pipelines pass ``t/1000``); falling
    timesteps (most samplers) count from the top, ``rising`` ones (Lumina2's ``1 - t``) from 0."""
    scale = 1.0 if abs(first_timestep) <= 1.0 + PROGRESS_EPS else 1000.0
    p = timestep / scale if rising else 1.0 - timestep / scale
    return min(max(p, 0.0), 1.0)


def reaches(points: tuple[float, ...], previous: float | None, current: float) -> bool:
    """A point of ``points`` lies after ``previous`` (the progress of the trajectory's previous
    step; None at its first) and at or before ``current``: this is the first step to reach it."""
    low = float("-inf") if previous is None else previous + PROGRESS_EPS
    return any(low < u <= current + PROGRESS_EPS for u in points)


class TrajectoryProgress:
    """The progress of each step of a runtime's current trajectory, from the timesteps its
    events carry: ``at(event)`` is ``(progress, previous)``, this step's and the previous step's
    (None where there is none, or the clock has no timestep).  The direction is learned from
    the trajectory's first two steps unless ``direction`` says it ("down"/"up"), and the
    previous step's progress is read again with it, so a rising trajectory (Lumina2) is not
    mistaken for a falling one at its first step.  ``lengths`` keeps the step counts of the
    trajectories it saw end (newest last, a few)."""

    def __init__(self, direction: str = "auto") -> None:
        self.direction = direction
        self.lengths: list[int] = []
        self.trajectory: int | None = None
        self.timesteps: dict[int, float] = {}

    def reset(self) -> None:
        self.trajectory, self.timesteps = None, {}

    def _rising(self) -> bool:
        if self.direction != "auto":
            return self.direction == "up"
        if len(self.timesteps) < 2:
            return False
        first, last = min(self.timesteps), max(self.timesteps)
        return self.timesteps[last] > self.timesteps[first]

    def steps(self) -> list[float]:
        """The progress of each step of the current trajectory seen so far, in step order."""
        if not self.timesteps:
            return []
        first, rising = self.timesteps[min(self.timesteps)], self._rising()
        return [progress(self.timesteps[s], first, rising) for s in sorted(self.timesteps)]

    def at(self, event) -> tuple[float | None, float | None]:
        t = getattr(event, "timestep", None)
        if t is None or not math.isfinite(t):
            return None, None
        if event.trajectory != self.trajectory:
            if self.timesteps:
                self.lengths = (self.lengths + [max(self.timesteps) + 1])[-8:]
            self.trajectory, self.timesteps = event.trajectory, {}
        self.timesteps.setdefault(event.step, float(t))
        first, rising = self.timesteps[min(self.timesteps)], self._rising()
        before = self.timesteps.get(event.step - 1)
        return (progress(self.timesteps[event.step], first, rising),
                None if before is None else progress(before, first, rising))


@dataclass(frozen=True)
class FullStepSchedule:
    """Full steps: the first ``warmup_steps``, every ``interval``-th step after, and ``reset_steps``.

    ``interval=1`` makes every step full (caching off); FORA's usual setting is 3.
    ``interval=None`` means no periodic full steps (SpecDiff: warm-up and resets only).
    ``partial_every``: None (no partial steps) or n ≥ 1: the n-th, 2n-th, … step after each
    full step is partial (1: every non-full step), the others cached.
    ``full_at``: progress points in (0, 1) (module docstring); the first step to reach each is
    full.  They need the step's ``progress`` and the previous step's (``previous``).
    """

    warmup_steps: int = 2
    interval: int | None = 3
    reset_steps: tuple[int, ...] = ()
    partial_every: int | None = None
    full_at: tuple[float, ...] = ()

    def is_full(self, step: int, progress: float | None = None, previous: float | None = None) -> bool:
        if step < self.warmup_steps or step in self.reset_steps:
            return True
        if self.full_at and progress is not None and reaches(self.full_at, previous, progress):
            return True
        return self.interval is not None and (step - self.warmup_steps) % self.interval == 0

    def kind(self, step: int, progress: float | None = None, previous: float | None = None,
             since_full: int | None = None) -> str:
        """``"full"``, ``"partial"`` or ``"cached"`` for ``step`` (0-based in its trajectory).
        ``since_full``: steps since the last full one, as the runtime saw them (needed with
        ``full_at``, whose past full steps the indices alone do not tell)."""
        if self.is_full(step, progress, previous):
            return FULL_STEP
        if self.partial_every is None:
            return CACHED_STEP
        if since_full is None:
            since_full = next(d for d in range(1, step + 1) if self.is_full(step - d))
        return PARTIAL_STEP if since_full % self.partial_every == 0 else CACHED_STEP


@dataclass(frozen=True)
class AlwaysFull:
    """The schedule of policy ``off``: nothing is ever read from a cache."""

    def is_full(self, step: int, progress: float | None = None, previous: float | None = None) -> bool:
        return True

    def kind(self, step: int, progress: float | None = None, previous: float | None = None,
             since_full: int | None = None) -> str:
        return FULL_STEP
