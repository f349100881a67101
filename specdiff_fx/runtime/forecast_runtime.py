"""Runtime of policy ``taylor``: full steps record Taylor terms, cached steps forecast.

The compiled variants (see docs/forecasting.md) take one coefficient buffer
``[c0, c1, a1, a2]``.  This runtime owns the step arithmetic behind it, per call slot:

* at a full step at position x, with the last full steps at x₁ (and x₂):
  ``c0 = 1/(x − x₁)`` (0 at a trajectory's first full step: no difference yet) and, for
  order 2, ``c1 = 2/(x − x₂)`` (Newton's divided difference; 0 until three full steps);
* at a cached step: ``(a1, a2)`` from the configured forecaster (runtime/forecasters.py;
  ``taylor``: ``a1 = k``, ``a2 = k²/2``) with ``k = x − x₁``.

Position x is the step index (``variable="step"``, TaylorSeer's choice) or the distance
travelled in timestep (``variable="timestep"``: ``x = −t``, which follows a sampler's
uneven spacing).  Everything is a tensor value, so no schedule recompiles.

With a probe (forecast variant computing the first block), each cached step writes a
forecast-error estimate into the slot's error buffer.  It is read at the *next* call (a
device-to-host read on every call after a probed forecast: ``stats()["forecast_errors"]``
lists them) and, with a ``tolerance``, above the threshold makes that step full.  The threshold at step s is ``tolerance · (1 + tolerance_growth · s)``: with a
growth > 0 it loosens along the trajectory, where a forecast error matters less.

Calibration (``calibrate(LeastSquares)``): every cached step runs the record graph instead,
so the step is exact and the recorded value ``g`` is known; ``(g − F, D1, D2)`` as they stood
before it go into the least-squares sums of the forecaster ``fitted``, and the terms are
put back, so the next full step records exactly as it would have.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Sequence

from ..buffers import BufferRole
from .forecasters import LeastSquares, coefficients
from .host_values import write_values
from ..variants import FORECAST, FULL
from .runtime import CachingRuntime

log = logging.getLogger("specdiff_fx")

VARIABLES = ("step", "timestep")


class ForecastSlotState:
    """What a call slot keeps for forecasting beyond its buffers (``SlotState.policy_state``):
    positions of the recorded full steps, and whether the last call left an error estimate."""

    def __init__(self) -> None:
        self.full_positions: list[float] = []   # newest last, at most 2 kept
        self.pending_error = False               # error buffer written by the last call


class ForecastRuntime(CachingRuntime):
    """Branch-level forecasting between full steps (policies ``taylor`` and ``sandwich``)."""

    slot_state = ForecastSlotState

    def __init__(self, *, order: int = 1, variable: str = "step", tolerance: float | None = None,
                 tolerance_growth: float = 0.0, probe: bool = False, forecaster: str = "taylor",
                 forecaster_options: dict | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if FORECAST not in self.variants:
            raise ValueError("a forecast runtime needs a 'forecast' variant")
        # the values come checked from the config (policies/taylor.py); not checked again here
        self.order = order
        self.forecaster = forecaster
        self.forecaster_options = dict(forecaster_options or {})
        self.calibration: LeastSquares | None = None
        self.variable = variable
        self.tolerance = tolerance
        self.tolerance_growth = float(tolerance_growth)
        self.probe = probe
        by_role = {s.role: s for s in self.buffer_specs}
        self._coef_spec = by_role[BufferRole.TAYLOR_COEF]
        self._error_spec = by_role[BufferRole.FORECAST_ERROR]
        self._term_specs = [s for s in self.buffer_specs if s.role == BufferRole.TAYLOR_TERM]

    def calibrate(self, sums: LeastSquares | None) -> None:
        """Turn calibration on (cached steps run exact and feed ``sums``) or off (None)."""
        if sums is not None and sums.order != self.order:
            raise ValueError(f"least-squares sums of order {sums.order} for a runtime of order {self.order}")
        self.calibration = sums

    def threshold(self, step: int) -> float | None:
        """The error threshold at ``step``: ``tolerance · (1 + tolerance_growth · step)``."""
        if self.tolerance is None:
            return None
        return self.tolerance * (1.0 + self.tolerance_growth * step)

    def _position(self, event) -> float:
        return float(event.step) if self.variable == "step" else -float(event.timestep)

    def _run_step(self, args: Sequence[Any], event) -> tuple[Any, str, dict | None]:
        slot = self.slots[event.slot]
        valid = slot.valid_for(event.trajectory)
        if not valid:
            slot.invalidate()  # another trajectory's positions: start afresh
        state: ForecastSlotState = slot.policy_state
        buffers = slot.buffers(self.buffer_specs)
        details: dict = {}
        error = None
        if state.pending_error:
            error = float(slot.buffer(self._error_spec))  # written by the previous (forecast) call
            details["error"] = error
            state.pending_error = False
        refresh = False
        if self.tolerance is not None and error is not None:
            threshold = self.threshold(event.step)
            details["threshold"] = threshold
            refresh = error > threshold
        x = self._position(event)
        if math.isnan(x):  # forecast_variable="timestep" on a clock without timesteps
            if "no timestep" not in self._warned:
                self._warned.add("no timestep")
                warnings.warn("specdiff: forecast_variable='timestep' but this frame's clock has no timestep "
                              "(a block compiled on its own whose scheduler has no timestep list): every step "
                              "runs full; use forecast_variable='step'", RuntimeWarning, stacklevel=4)
            valid = False
        progress, previous = self._progress(event)
        self._check_fitted_range(event.step)
        if self.calibration is not None:
            self.calibration.note_step((id(self), event.trajectory), event.step)
        full = not valid or self.schedule.is_full(event.step, progress, previous) or refresh
        coef = slot.buffer(self._coef_spec)
        if full:
            prev = state.full_positions
            c0 = 1.0 / (x - prev[-1]) if prev and x != prev[-1] else 0.0
            c1 = 2.0 / (x - prev[-2]) if self.order == 2 and len(prev) >= 2 and x != prev[-2] else 0.0
            write_values(coef, [c0, c1, 0.0, 0.0])
            out = self.variants[FULL](*args, *buffers)
            slot.stamp(event.trajectory, event.step)
            state.full_positions = (prev + [x])[-2:]
            if refresh:
                details["refresh"] = True
                log.debug("specdiff: step %d full: forecast error %.4g over the threshold %.4g",
                          event.step, error, details["threshold"])
            return out, FULL, details or None
        k = x - state.full_positions[-1]
        if self.calibration is not None:
            return self._calibration_step(args, slot, buffers, event.step, k, progress)
        gap = state.full_positions[-1] - state.full_positions[-2] if len(state.full_positions) > 1 else None
        a1, a2 = coefficients(self.forecaster, k, gap, event.step, self.forecaster_options, progress)
        write_values(coef, [0.0, 0.0, a1, a2])
        out = self.variants[FORECAST](*args, *buffers)
        state.pending_error = self.probe
        details["k"] = k
        return out, FORECAST, details

    def _check_fitted_range(self, step: int) -> None:
        """A sampler-time table fitted on some step counts (``coefficients_at["step_counts"]``)
        warns once when a trajectory runs longer than the longest of them, or ended shorter than
        the shortest: its ratios were never measured at that spacing."""
        table = self.forecaster_options.get("coefficients_at") if self.forecaster == "fitted" else None
        counts = table.get("step_counts") if table else None
        if not counts or "fitted range" in self._warned:
            return
        ended = self.progress.lengths[-1:] if step == 0 else []
        outside = step + 1 > max(counts) or any(n < min(counts) for n in ended)
        if outside:
            self._warned.add("fitted range")
            length = f"ran {step + 1} steps" if step + 1 > max(counts) else f"ran {ended[0]} steps"
            warnings.warn(f"specdiff: a trajectory {length}, outside the step counts the fitted forecaster was fitted "
                          f"on ({counts}); its quality there was never measured (fit on this step count too: "
                          "specdiff-fx tune --steps, or fit_forecaster(..., sampler_time=True) over it)",
                          RuntimeWarning, stacklevel=5)

    def _calibration_step(self, args, slot, buffers, step: int, k: float,
                          progress: float | None = None) -> tuple[Any, str, dict]:
        """An exact step that measures what the forecast should have been (module docstring)."""
        terms = slot.buffers(self._term_specs)
        before = [t.clone() for t in terms]
        write_values(slot.buffer(self._coef_spec), [1.0 / k, 0.0, 0.0, 0.0])
        out = self.variants[FULL](*args, *buffers)
        per = self.order + 1
        rows = []
        for j in range(0, len(terms), per):
            f_old, d1 = before[j], before[j + 1]
            rows.append((terms[j].float() - f_old.float(), d1, before[j + 2] if self.order == 2 else None))
        self.calibration.add(step, rows, progress=progress, k=k)
        for t, b in zip(terms, before):
            t.copy_(b)
        return out, FULL, {"calibration": True, "k": k}

    def _extra_stats(self) -> dict:
        errors = [d["error"] for e in self._plan for d in e.get("details", []) if "error" in d]
        refreshes = sum(1 for e in self._plan for d in e.get("details", []) if d.get("refresh"))
        return {"order": self.order, "forecaster": self.forecaster, "variable": self.variable, "tolerance": self.tolerance,
                "tolerance_growth": self.tolerance_growth, "probe": self.probe, "forecast_errors": errors,
                "error_refreshes": refreshes}
