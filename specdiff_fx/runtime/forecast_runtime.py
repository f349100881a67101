"""Runtime of policy ``taylor``: full steps record Taylor terms, cached steps forecast.

The compiled variants (see docs/forecasting.md) take one coefficient buffer
``[c0, c1, a1, a2]``.  This runtime owns the step arithmetic behind it, per call slot:

* at a full step at position x, with the last full steps at x₁ (and x₂):
  ``c0 = 1/(x − x₁)`` (0 at a trajectory's first full step: no difference yet) and, for
  order 2, ``c1 = 2/(x − x₂)`` (Newton's divided difference; 0 until three full steps);
* at a cached step: ``a1 = k``, ``a2 = k²/2`` with ``k = x − x₁``.

Position x is the step index (``variable="step"``, TaylorSeer's choice) or the distance
travelled in timestep (``variable="timestep"``: ``x = −t``, which follows a sampler's
uneven spacing).  Everything is a tensor value, so no schedule recompiles.

With a probe (forecast variant computing the first block), each cached step writes a
forecast-error estimate into the slot's error buffer.  It is read at the *next* call (a
device-to-host read only when a ``tolerance`` is set) and, above the tolerance, makes that
step full.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..buffers import BufferRole
from .host_values import write_values
from .runtime import FULL, SpecDiffRuntime

FORECAST = "forecast"
VARIABLES = ("step", "timestep")


class _SlotForecast:
    """Per-slot forecast state: positions of the recorded full steps, last error estimate."""

    def __init__(self) -> None:
        self.trajectory: int | None = None
        self.full_positions: list[float] = []   # newest last, at most 2 kept
        self.pending_error = False               # error buffer written by the last call


class ForecastRuntime(SpecDiffRuntime):
    """Branch-level forecasting between full steps (policy ``taylor``)."""

    def __init__(self, *, order: int = 1, variable: str = "step", tolerance: float | None = None,
                 probe: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if FORECAST not in self.variants:
            raise ValueError("a forecast runtime needs a 'forecast' variant")
        if variable not in VARIABLES:
            raise ValueError(f"variable must be one of {VARIABLES}, got {variable!r}")
        if tolerance is not None and not probe:
            raise ValueError("a tolerance needs the probe's error estimate (probe=True)")
        self.order = order
        self.variable = variable
        self.tolerance = tolerance
        self.probe = probe
        roles = [s.role for s in self.slots.specs]
        self._coef_index = roles.index(BufferRole.TAYLOR_COEF)
        self._error_index = roles.index(BufferRole.FORECAST_ERROR)

    def _init_state(self) -> None:
        super()._init_state()
        self._states: dict[int, _SlotForecast] = {}

    def _position(self, event) -> float:
        return float(event.step) if self.variable == "step" else -float(event.timestep)

    def _run_step(self, args: Sequence[Any], event) -> tuple[Any, str, dict | None]:
        slot = self.slots[event.slot]
        state = self._states.setdefault(event.slot, _SlotForecast())
        valid = slot.valid_for(event.trajectory) and state.trajectory == event.trajectory
        if not valid:
            state.__init__()
            state.trajectory = event.trajectory
        details: dict = {}
        error = None
        if state.pending_error:
            error = float(slot.buffers[self._error_index])  # written by the previous (forecast) call
            details["error"] = error
            state.pending_error = False
        refresh = self.tolerance is not None and error is not None and error > self.tolerance
        full = not valid or self.schedule.is_full(event.step) or refresh
        x = self._position(event)
        coef = slot.buffers[self._coef_index]
        if full:
            prev = state.full_positions
            c0 = 1.0 / (x - prev[-1]) if prev and x != prev[-1] else 0.0
            c1 = 2.0 / (x - prev[-2]) if self.order == 2 and len(prev) >= 2 and x != prev[-2] else 0.0
            write_values(coef, [c0, c1, 0.0, 0.0])
            out = self.variants[FULL](*args, *slot.buffers)
            slot.stamp(event.trajectory, event.step)
            state.full_positions = (prev + [x])[-2:]
            if refresh:
                details["refresh"] = True
            return out, FULL, details or None
        k = x - state.full_positions[-1]
        write_values(coef, [0.0, 0.0, k, 0.5 * k * k])
        out = self.variants[FORECAST](*args, *slot.buffers)
        state.pending_error = self.probe
        details["k"] = k
        return out, FORECAST, details

    def _drop_caches(self) -> None:
        self._states.clear()

    def _extra_stats(self) -> dict:
        errors = [d["error"] for e in self._plan for d in e.get("details", []) if "error" in d]
        refreshes = sum(1 for e in self._plan for d in e.get("details", []) if d.get("refresh"))
        return {"order": self.order, "variable": self.variable, "tolerance": self.tolerance,
                "probe": self.probe, "forecast_errors": errors, "error_refreshes": refreshes}
