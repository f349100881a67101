"""Policy ``off``: the plain graph, compiled, with step tracking only.

Why a policy at all: it is the baseline every other policy is checked against (same clock,
same ``stats()``), and a user can switch caching off without leaving the backend.
"""

from __future__ import annotations

from ..runtime import FULL, AlwaysFull, CachingRuntime
from .base import BuildContext, Policy


class Off(Policy):
    name = "off"
    order = 0
    summary = "no caching: every step runs the plain graph (step tracking only)"
    schedule = (1, 1, ())
    runs_at = {FULL: "every step"}
    needs_branches = False

    def build(self, ctx: BuildContext) -> CachingRuntime:
        return CachingRuntime(policy=self.name, variants={FULL: ctx.compile(ctx.gm, ctx.example_inputs)},
                               schedule=AlwaysFull(), **ctx.common)


POLICY = Off()
