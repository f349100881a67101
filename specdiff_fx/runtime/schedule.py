"""Which steps run the full graph and which may read caches."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FullStepSchedule:
    """Full steps: the first ``warmup_steps``, every ``interval``-th step after, and ``reset_steps``.

    ``interval=1`` makes every step full (caching off); FORA's usual setting is 3.
    ``interval=None`` means no periodic full steps (SpecDiff: warm-up and resets only).
    """

    warmup_steps: int = 2
    interval: int | None = 3
    reset_steps: tuple[int, ...] = ()

    def is_full(self, step: int) -> bool:
        if step < self.warmup_steps or step in self.reset_steps:
            return True
        return self.interval is not None and (step - self.warmup_steps) % self.interval == 0


@dataclass(frozen=True)
class AlwaysFull:
    """The schedule of policy ``off``: nothing is ever read from a cache."""

    def is_full(self, step: int) -> bool:
        return True
