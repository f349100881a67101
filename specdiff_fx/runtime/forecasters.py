"""Forecasters of policy ``taylor``: how a cached step weighs the recorded terms.

Why a table of coefficient laws and not one graph per method: the record graph keeps, per
forecast target, ``F`` (the value at the last full step), ``D1`` (its first divided
difference over the last gap) and, at order 2, ``D2`` (twice the second divided
difference), and the forecast graph reads ``F + a1·D1 + a2·D2`` with ``a1, a2`` taken from a
tensor input.  Every forecast that is linear in the last two or three recorded values —
Taylor, exact polynomial extrapolation, damped (Hermite-type) series, a per-step
least-squares predictor — is such a pair ``(a1, a2)``.  A forecaster is therefore one entry
here, a host function of the step geometry; the compiled graphs are the same for all of
them and no choice of forecaster or schedule recompiles (docs/forecasting.md,
"Forecasters").

An entry also carries what the rest of the package needs to know about it, so adding a
forecaster is one :func:`register` call: the option keys it reads and its own check of their
values (policy ``taylor`` checks the name, the order and the keys from the entry, then calls
the check), and how ``tune`` tries it (the options it tries by default, or that its options
come from :func:`specdiff_fx.fit_forecaster`).

Geometry handed to a law, in the runtime's position unit (steps, or timestep distance):

* ``k``: distance from the last full step to this step;
* ``gap``: distance between the last two full steps (None before there are two);
* ``step``: this step's index in its trajectory (for per-step tables);
* ``progress``: this step's progress through the noise schedule in [0, 1]
  (runtime/schedule.py; None where the clock has no timestep).

A per-step table is tied to the step count it was fitted at (step 13 is the middle of 28 steps
and a quarter of 50).  ``fitted`` therefore also takes a table in the sampler's time,
``coefficients_at``: ratios to the Taylor terms (``a1 = ρ1·k``, ``a2 = ρ2·k²/2``) at progress
points, interpolated linearly between them.  A ratio does not depend on the position unit or
the step count, so one table serves 20, 28 or 50 steps.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

CoefficientLaw = Callable[[float, "float | None", int, Mapping, "float | None"], "tuple[float, float]"]
OptionCheck = Callable[[Mapping], dict]


@dataclass(frozen=True)
class Forecaster:
    """One entry of :data:`FORECASTERS`."""

    name: str
    min_order: int       # Taylor terms the graphs must hold (2: the law uses D2)
    law: CoefficientLaw  # (k, gap, step, options, progress) -> (a1, a2)
    summary: str
    options: frozenset = frozenset()  # the keys of SpecDiffConfig.forecaster_options it reads
    check: OptionCheck | None = None
    """``check(options) -> options``: the values of its option keys, normalised, or a ValueError
    saying what is wrong (the config names the field and the forecaster); None: any value."""
    tune_options: Mapping | None = None
    """The options ``tune`` tries it with by default (None: not among tune's default candidates)."""
    fitted: bool = False
    """Its options come from :func:`specdiff_fx.fit_forecaster` (``tune`` fits it on its fit
    batches before scoring it)."""


FORECASTERS: dict[str, Forecaster] = {}


def register(name: str, min_order: int, summary: str, options: tuple[str, ...] = (), *,
             check: OptionCheck | None = None, tune_options: Mapping | None = None, fitted: bool = False):
    """Decorator: add a coefficient law to :data:`FORECASTERS` under ``name``, reading the
    ``options`` keys of ``SpecDiffConfig.forecaster_options`` (any other key is refused there),
    their values checked by ``check``; ``tune_options`` and ``fitted`` as in :class:`Forecaster`."""

    def wrap(law: CoefficientLaw) -> CoefficientLaw:
        if name in FORECASTERS:
            raise ValueError(f"forecaster {name!r} is registered twice")
        FORECASTERS[name] = Forecaster(name, min_order, law, summary, frozenset(options), check,
                                       None if tune_options is None else dict(tune_options), fitted)
        return law

    return wrap


def tune_candidates() -> tuple[tuple[str, dict], ...]:
    """``(name, options)`` of every forecaster ``tune`` tries by default, in registration order."""
    return tuple((f.name, dict(f.tune_options)) for f in FORECASTERS.values() if f.tune_options is not None)


def _check_sigma(options: Mapping) -> dict:
    sigma = options.get("sigma", 0.7)
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 < sigma <= 2:
        raise ValueError(f"['sigma'] must be in (0, 2], got {sigma!r}")
    return dict(options)


def _check_coefficients(options: Mapping) -> dict:
    if "coefficients_at" in options:
        if "coefficients" in options:
            raise ValueError("takes one table: 'coefficients' (per step) or 'coefficients_at' (in the sampler's time)")
        return dict(options, coefficients_at=_check_table_at(options["coefficients_at"]))
    table = options.get("coefficients")
    if not isinstance(table, dict) or not table:
        raise ValueError("needs {'coefficients': {step: (a1, a2)}} or {'coefficients_at': {'progress': [...], "
                         "'ratios': [[r1, r2], ...]}} (from specdiff_fx.fit_forecaster)")
    try:  # JSON turns the step keys into strings
        clean = {int(step): (float(a[0]), float(a[1])) for step, a in table.items()}
    except (TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"['coefficients'] must map step -> (a1, a2), got {table!r}") from exc
    return dict(options, coefficients=clean)


def _check_table_at(table: Any) -> dict:
    try:
        points = [float(p) for p in table["progress"]]
        ratios = [(float(r[0]), float(r[1])) for r in table["ratios"]]
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"['coefficients_at'] must be {{'progress': [p, ...], 'ratios': [[r1, r2], ...]}}, "
                         f"got {table!r}") from exc
    if not points or len(points) != len(ratios) or points != sorted(points) or not 0 <= points[0] <= points[-1] <= 1:
        raise ValueError(f"['coefficients_at'] needs as many ratios as progress points, the points rising in [0, 1]; "
                         f"got {table!r}")
    out = {"progress": points, "ratios": [list(r) for r in ratios]}
    if table.get("step_counts"):  # the trajectory lengths it was fitted on (the runtime warns outside them)
        out["step_counts"] = sorted(int(n) for n in table["step_counts"])
    return out


def _at(table: Mapping, progress: float) -> tuple[float, float]:
    """The ratios of a sampler-time table at ``progress``: linear between its points, the end
    values beyond them."""
    points, ratios = table["progress"], table["ratios"]
    i = bisect.bisect_left(points, progress)
    if i == 0:
        return tuple(ratios[0])
    if i == len(points):
        return tuple(ratios[-1])
    w = (progress - points[i - 1]) / (points[i] - points[i - 1])
    return tuple((1 - w) * a + w * b for a, b in zip(ratios[i - 1], ratios[i]))


@register("taylor", 1, "TaylorSeer: F + k·D1 (+ k²/2·D2)", tune_options={})
def _taylor(k, gap, step, options, progress):
    return k, 0.5 * k * k


@register("newton", 2, "the parabola through the last three full steps: F + k·D1 + k(k+gap)/2·D2")
def _newton(k, gap, step, options, progress):
    # Newton's form at x1 + k with nodes x1, x0 = x1 - gap: k·f[x1,x0] + k(k + gap)·f[x1,x0,x_] ;
    # D2 holds 2·f[x1,x0,x_], hence the 1/2.
    return k, 0.5 * k * (k + (gap if gap is not None else 0.0))


@register("hermite", 1, "damped series (HiCache-type scaling σ): F + σ²k·D1 + σ²(σ²k²−1)/2·D2", options=("sigma",),
          check=_check_sigma, tune_options={"sigma": 0.7})
def _hermite(k, gap, step, options, progress):
    # The probabilists' Hermite polynomials He1(x) = x, He2(x) = x² − 1 of the contracted
    # distance σk, each term shrunk by σⁿ: σ < 1 damps the extrapolation, and the −1 of He2
    # pulls the quadratic term back where k is small.
    s = float(options.get("sigma", 0.7))
    return s * s * k, 0.5 * s * s * (s * s * k * k - 1.0)


@register("fitted", 1, "(a1, a2) fitted by least squares on calibration trajectories: per step, or as ratios "
          "to the Taylor terms along the sampler's progress (coefficients_at)",
          options=("coefficients", "coefficients_at"), check=_check_coefficients, tune_options={}, fitted=True)
def _fitted(k, gap, step, options, progress):
    at = options.get("coefficients_at")
    if at is not None:
        if progress is None:  # a clock without timesteps: no place on the table
            return _taylor(k, gap, step, options, progress)
        r1, r2 = _at(at, progress)
        return r1 * k, r2 * 0.5 * k * k
    table = options.get("coefficients") or {}
    if step in table:
        a1, a2 = table[step]
        return float(a1), float(a2)
    return _taylor(k, gap, step, options, progress)  # a step the calibration did not see


def coefficients(name: str, k: float, gap: float | None, step: int, options: Mapping,
                 progress: float | None = None) -> tuple[float, float]:
    """``(a1, a2)`` of forecaster ``name`` (finite, or a ValueError naming the law)."""
    a1, a2 = FORECASTERS[name].law(k, gap, step, options, progress)
    if not (math.isfinite(a1) and math.isfinite(a2)):
        raise ValueError(f"forecaster {name!r} gave non-finite coefficients {(a1, a2)} at k={k}, step={step}")
    return float(a1), float(a2)


class LeastSquares:
    """Per step, the normal equations of ``min Σ ‖r − a1·D1 − a2·D2‖²`` over every forecast
    target and calibration trajectory, where ``r = g − F`` is what the forecast should have
    added to the last full step's value.  Accumulated in float64 from fp32 dot products."""

    def __init__(self, order: int, sampler_time: bool = False) -> None:
        self.order = order
        # sampler_time: fit ratios to the Taylor terms (k·D1, k²/2·D2) per progress point,
        # pooled over every step count the calibration runs (module docstring)
        self.sampler_time = sampler_time
        self.sums: dict = {}  # step (or progress) -> [D1·D1, D1·D2, D2·D2, D1·r, D2·r, n]
        self._last_step: dict = {}  # (runtime, trajectory) -> the last step index it ran (note_step)

    def note_step(self, key: Any, step: int) -> None:
        """A calibration trajectory (``key``) ran ``step``: its length is known from these."""
        self._last_step[key] = max(step, self._last_step.get(key, -1))

    @property
    def step_counts(self) -> list[int]:
        """The step counts of the calibration trajectories (from :meth:`note_step`)."""
        return sorted({s + 1 for s in self._last_step.values()})

    def add(self, step: int, terms: list[tuple[object, object, object | None]], progress: float | None = None,
            k: float | None = None) -> None:
        """``terms``: per target ``(r, D1, D2 or None)`` tensors of one slot at one step (at
        ``progress``, ``k`` from the last full step: needed in sampler time)."""
        if self.sampler_time:
            if progress is None or not k:
                return  # no place in the sampler's time (a clock without timesteps)
            key, u1, u2 = round(progress, 6), k, 0.5 * k * k
        else:
            key, u1, u2 = step, 1.0, 1.0
        s = self.sums.setdefault(key, [0.0] * 6)
        for r, d1, d2 in terms:
            r, d1 = r.float().flatten(), u1 * d1.float().flatten()
            s[0] += float(d1 @ d1)
            s[3] += float(d1 @ r)
            if d2 is not None:
                d2 = u2 * d2.float().flatten()
                s[1] += float(d1 @ d2)
                s[2] += float(d2 @ d2)
                s[4] += float(d2 @ r)
        s[5] += 1

    def solve(self, ridge: float = 1e-6) -> dict[int, tuple[float, float]]:
        """Per step ``(a1, a2)``; a tiny ridge (relative to the diagonal) keeps a step whose D2
        vanishes (too few full steps yet) solvable, giving it ``a2 = 0``."""
        out = {}
        for step, (dd, de, ee, dr, er, _) in sorted(self.sums.items()):
            if dd <= 0:
                continue
            if self.order < 2 or ee <= 0:
                out[step] = (dr / dd, 0.0)
                continue
            dd_, ee_ = dd * (1 + ridge), ee * (1 + ridge)
            det = dd_ * ee_ - de * de
            if det <= 0:
                out[step] = (dr / dd, 0.0)
                continue
            out[step] = ((ee_ * dr - de * er) / det, (dd_ * er - de * dr) / det)
        return out

    def solve_at(self, ridge: float = 1e-6) -> dict:
        """The sampler-time table (``sampler_time=True``): ``{"progress": [...], "ratios": [[r1, r2], ...]}``,
        with ``"step_counts"`` the trajectory lengths it was fitted on."""
        if not self.sampler_time:
            raise ValueError("solve_at needs LeastSquares(sampler_time=True)")
        table = self.solve(ridge)
        points = sorted(table)
        return {"progress": points, "ratios": [list(table[p]) for p in points], "step_counts": self.step_counts}
