"""Fit the ``fitted`` forecaster of policy ``taylor`` on the user's own trajectories.

Why fitting is cheap here: every forecaster is a pair ``(a1, a2)`` per cached step over the
terms the record graph keeps (runtime/forecasters.py), so the best linear forecast of the
calibration runs is a 2×2 least-squares problem per step.  While :func:`fit_forecaster`
runs the user's calls, each cached step runs the record graph instead (exact) and adds what
the forecast should have been to the sums; the terms are put back after it, so the full
steps record as they will at inference.  One calibration run costs about one uncached run.

The table is per step index of the schedule it was fitted with: a different step count or
full-step schedule needs a new fit (a step the table lacks falls back to ``taylor``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .backend import SpecDiffBackend, backend_of
from .runtime.forecast_runtime import ForecastRuntime
from .runtime.forecasters import LeastSquares

log = logging.getLogger("specdiff_fx")


def _backends(target: Any) -> list[SpecDiffBackend]:
    caching = getattr(target, "_specdiff", None)
    if caching is not None:  # a pipeline from compile_pipeline
        return list(caching.backends.values())
    return [backend_of(target)]


def fit_forecaster(target: Any, run: Callable[[], Any], *, ridge: float = 1e-6, sampler_time: bool = False) -> dict:
    """Run ``run()`` (calibration trajectories through ``target``: a model compiled with
    policy ``taylor``, or a pipeline from :func:`~specdiff_fx.compile_pipeline`), fit
    coefficients, and switch ``target`` to ``forecaster="fitted"`` with them.

    Per step (the default): returns ``{step: (a1, a2)}``, saved as
    ``forecaster_options={"coefficients": table}``; it holds at the step count it was fitted at.
    ``sampler_time=True``: ratios to the Taylor terms at each step's progress through the noise
    schedule, pooled over every step count ``run()`` samples (runtime/forecasters.py); returns
    ``{"progress": [...], "ratios": [...], "step_counts": [...]}``, saved as
    ``forecaster_options={"coefficients_at": table}``, and usable at other step counts."""
    backends = _backends(target)
    for backend in backends:
        if backend.config.policy != "taylor":
            raise ValueError(f"fit_forecaster needs policy 'taylor', this target has {backend.config.policy!r}")
    order = backends[0].config.taylor_order
    sums = LeastSquares(order, sampler_time=sampler_time)
    runtimes: list[ForecastRuntime] = []

    def forecast_runtimes() -> list[ForecastRuntime]:
        return [rt for b in backends for rt in b.all_runtimes() if isinstance(rt, ForecastRuntime)]

    try:
        for backend in backends:
            backend.forecast_calibration = sums
        for rt in forecast_runtimes():
            rt.reset()
            rt.calibrate(sums)
        run()
        runtimes = forecast_runtimes()
    finally:
        for backend in backends:
            backend.forecast_calibration = None
        for rt in forecast_runtimes():
            rt.calibrate(None)
    if not runtimes:
        raise ValueError("fit_forecaster: run() made no call through a forecasting graph (did the model fall back? "
                         "see get_runtime(model).stats()['fallback'])")
    table = sums.solve_at(ridge) if sampler_time else sums.solve(ridge)
    if not (table["progress"] if sampler_time else table):
        raise ValueError("fit_forecaster: run() had no cached step to fit (is the schedule all full steps"
                         + ("; do the calls carry timesteps?" if sampler_time else "") + ")")
    options = {"coefficients_at": table} if sampler_time else {"coefficients": table}
    for backend in backends:
        backend.config = backend.config.replace(forecaster="fitted", forecaster_options=options)
    for rt in runtimes:
        rt.forecaster, rt.forecaster_options = "fitted", dict(options)
        rt.reset()
    log.info("specdiff: fitted forecast coefficients (%s): %s", "sampler time" if sampler_time else "per step", table)
    return table
