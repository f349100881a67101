"""Fit the ``fitted`` forecaster of policy ``taylor`` on the user's own trajectories.

Why fitting is cheap here: every forecaster is a pair ``(a1, a2)`` per cached step over the
terms the record graph keeps (runtime/forecasters.py), so the best linear forecast of the
calibration runs is a 2×2 least-squares problem per step.  While :func:`fit_forecaster`
runs the user's calls, each cached step runs the record graph instead (exact) and adds what
the forecast should have been to the sums; the terms are put back after it, so the full
steps record as they will at inference.  One calibration run costs about one uncached run.

The table is per step index of the schedule it was fitted with: a different step count or
full-step schedule needs a new fit (a step the table lacks falls back to ``taylor``).

**Refining the fit on the images** (:func:`refine_forecaster`).  The least-squares fit asks each
forecast step to match the exact model output *on the exact trajectory*.  At inference every
forecast starts from a trajectory that earlier forecasts moved, and the errors compound; the
coefficients that give the best images are not the per-step best.  Refinement searches the
table's first coefficients (one per forecast step or progress point) for the lowest error of the
*final outputs* against the uncached ones, running the calibration calls with the cached
schedule itself: a coordinate (pattern) search, each trial one re-pointing of the runtimes and
one cached run, no gradient and no recompile.  On the reference model with five full steps of 28
it moved the PSNR on unseen seeds from 27.6 to about 30 dB (docs/forecasting.md).  It fits the
calibration calls more closely than least squares does, so score it on other calls (``tune``
does).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

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


def _table_values(options: dict) -> tuple[list[float], Callable[[list[float]], dict]]:
    """The searched values of a fitted table (each entry's first coefficient: ``a1`` per step, or
    the ratio ``ρ1`` per progress point) and how to write a table back from them."""
    if "coefficients_at" in options:
        table = options["coefficients_at"]
        values = [float(r[0]) for r in table["ratios"]]

        def build(v: list[float]) -> dict:
            ratios = [[x, float(r[1])] for x, r in zip(v, table["ratios"])]
            return {"coefficients_at": dict(table, ratios=ratios)}
    else:
        table = {int(k): tuple(v) for k, v in options["coefficients"].items()}
        steps = sorted(table)
        values = [float(table[k][0]) for k in steps]

        def build(v: list[float]) -> dict:
            return {"coefficients": {k: (x, float(table[k][1])) for k, x in zip(steps, v)}}
    return values, build


MAX_MOVES = 8  # moves of one value in one direction per sweep (refine_forecaster)


def refine_forecaster(target: Any, run: Callable[[], Any], reference: Any, *, sweeps: int = 4,
                      first_step: float = 0.5) -> dict:
    """Refine the ``fitted`` forecaster ``target`` runs (after :func:`fit_forecaster`) on the final
    outputs (module docstring): ``run()`` runs calibration calls through ``target`` and returns
    their outputs (a tensor, or a list of tensors), ``reference`` the uncached outputs of the same
    calls.  Each sweep tries every value ``x`` of the table at ``x ± d·max(|x|, 0.5)`` and keeps
    moving it that way while the mean squared error falls; ``d`` starts at ``first_step`` and
    halves each sweep.  Returns the refined ``forecaster_options``; ``target`` is left on them.
    The error never rises: a trial is kept only where it lowers it."""
    backends = _backends(target)
    cfg = backends[0].config
    if cfg.policy != "taylor" or cfg.forecaster != "fitted":
        raise ValueError("refine_forecaster needs policy 'taylor' with the fitted forecaster: call fit_forecaster first")
    if sweeps < 1 or not 0 < first_step:
        raise ValueError("refine_forecaster: sweeps >= 1 and first_step > 0")
    values, build = _table_values(dict(cfg.forecaster_options))
    want = _flat(reference)

    def point(options: dict) -> None:
        for backend in backends:
            backend.config = backend.config.replace(forecaster_options=options)
            for rt in backend.all_runtimes():
                if isinstance(rt, ForecastRuntime):
                    rt.forecaster_options = dict(options)
                    rt.reset()

    def error(v: list[float]) -> float:
        point(build(v))
        with torch.no_grad():
            got = _flat(run())
        if got.shape != want.shape:
            raise ValueError(f"refine_forecaster: run() gave {tuple(got.shape)} values, the reference "
                             f"{tuple(want.shape)}")
        return float(torch.mean((got - want) ** 2))

    best = start = error(values)
    trials = 0
    d = first_step
    for _ in range(sweeps):
        for i in range(len(values)):
            for sign in (1.0, -1.0):
                moves = 0
                while moves < MAX_MOVES:  # each move grows with |x|: bounded, as a diverging table is
                    trial = list(values)
                    trial[i] += sign * d * max(abs(values[i]), 0.5)
                    e = error(trial)  # NaN (a diverging forecast) is never kept
                    trials += 1
                    if not e < best:
                        break
                    values, best, moves = trial, e, moves + 1
                if moves:
                    break  # this way helped; the other way is tried again next sweep
        d /= 2
    options = build(values)
    point(options)
    log.info("specdiff: refined forecast coefficients in %d trials: output MSE %.3g -> %.3g", trials, start, best)
    return options


def _flat(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().float().flatten()
    return torch.cat([_flat(o) for o in outputs])
