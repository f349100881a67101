"""Which steps of a trajectory run the full graph, a partial (token) step, or a cached step.

One schedule object serves every policy.  Full steps: the first ``warmup_steps``, every
``interval``-th step after them, and ``reset_steps``.  The steps in between are *cached*
(fora: reuse, taylor: forecast); with ``partial_every`` (specdiff) every ``partial_every``-th
of them, counted from the last full step, is a *partial* step that computes the most important
tokens and corrects their forecast, and the others are cached (specdiff: all tokens
forecast).  A runtime may still make a step full on its own (a new trajectory, a cache
that is not valid, a forecast-error estimate over its tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass

FULL_STEP, PARTIAL_STEP, CACHED_STEP = "full", "partial", "cached"


@dataclass(frozen=True)
class FullStepSchedule:
    """Full steps: the first ``warmup_steps``, every ``interval``-th step after, and ``reset_steps``.

    ``interval=1`` makes every step full (caching off); FORA's usual setting is 3.
    ``interval=None`` means no periodic full steps (SpecDiff: warm-up and resets only).
    ``partial_every``: None (no partial steps) or n ≥ 1: the n-th, 2n-th, … step after each
    full step is partial (1: every non-full step), the others cached.
    """

    warmup_steps: int = 2
    interval: int | None = 3
    reset_steps: tuple[int, ...] = ()
    partial_every: int | None = None

    def is_full(self, step: int) -> bool:
        if step < self.warmup_steps or step in self.reset_steps:
            return True
        return self.interval is not None and (step - self.warmup_steps) % self.interval == 0

    def kind(self, step: int) -> str:
        """``"full"``, ``"partial"`` or ``"cached"`` for ``step`` (0-based in its trajectory)."""
        if self.is_full(step):
            return FULL_STEP
        if self.partial_every is None:
            return CACHED_STEP
        since_full = next(d for d in range(1, step + 1) if self.is_full(step - d))
        return PARTIAL_STEP if since_full % self.partial_every == 0 else CACHED_STEP


@dataclass(frozen=True)
class AlwaysFull:
    """The schedule of policy ``off``: nothing is ever read from a cache."""

    def is_full(self, step: int) -> bool:
        return True

    def kind(self, step: int) -> str:
        return FULL_STEP
