"""Quality a user can ask for: pick policy ``taylor``'s full-step schedule and forecaster for a
requested speed-up, or the fastest for a requested PSNR, on the user's own calls.

Why it is cheap: a schedule and a forecaster are runtime state, not graph structure
(docs/forecasting.md).  The target is compiled once; every candidate only re-points the
runtimes (:func:`configure`), so trying dozens costs a few sampling runs each and no compile.

What is measured, on the user's machine and calls:

* **speed**: three timed runs give the model ``time(n) = o + n·r + (N − n)·f`` of a trajectory
  with ``n`` full steps of ``N`` (``o`` the work outside the denoiser, ``r`` a record step,
  ``f`` a forecast step): the uncached run (policy ``off``, the same compiler), an all-full run
  and a one-full-step run.  A candidate's predicted speed-up is ``uncached / time(n)``.
* **quality**: each candidate's PSNR against the uncached outputs on evaluation batches; the
  ``fitted`` forecaster is fitted on other batches first (calibrate.py), so its score is not
  measured on what it was fitted to.
* **the choice, timed**: the linear model misses what it cannot see (on the reference model it
  over-predicted six-full-step schedules by about 16 %: the first call of a variant after the
  other pays for cold caches), so with a ``timer`` the leading candidates are run and timed
  against the uncached run, alternately; every measurement rescales the remaining predictions
  by the measured/predicted ratio so far, and the choice rests on measured speed.

Candidates are *global* schedules: for each count of full steps, the warm-up plus the other
full steps spread by a power law over the trajectory (gaps growing, even, or shrinking),
not only fixed intervals.

**Several step counts** (:class:`OtherSteps`, ``specdiff-fx tune --steps 28,20,50``): a
schedule is placed in the sampler's time, so the same config runs at any step count, but its
quality there is not the quality at the count it was chosen on (a forecast spans more steps at
50, fewer at 20).  Each candidate is then also scored at the other counts, the ``fitted``
forecaster is fitted on all of them pooled, and a trial's PSNR is its lowest over the counts:
the choice holds at every count it was tuned for, and the runtime warns when a trajectory
falls outside them.  Speed is requested at the first count; each count's predicted speed-up
comes from its own step costs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from .backend import SpecDiffBackend, backend_of
from .calibrate import fit_forecaster, refine_forecaster
from .config import SpecDiffConfig
from .quality import psnr
from .runtime.forecast_runtime import ForecastRuntime
from .runtime.forecasters import FORECASTERS, tune_candidates
from .runtime.schedule import FullStepSchedule

log = logging.getLogger("specdiff_fx")

DEFAULT_FORECASTERS = tune_candidates()  # the registry entries with tune_options (runtime/forecasters.py)
DEFAULT_SHAPES = (0.8, 0.9, 1.0, 1.15, 1.3)
SPEED_SLACK = 0.03  # a prediction this far below the request still meets it (the timings' own spread)


@dataclass(frozen=True)
class Schedule:
    """Full steps ``0 … warmup−1`` and ``full``; every other step forecast.  ``at``: the progress
    of each step of ``full`` through the noise schedule (:func:`step_progress`); then the config
    places them in the sampler's time (``full_at``), so it holds at other step counts."""

    warmup: int
    full: tuple[int, ...]
    at: tuple[float, ...] = ()

    def full_steps(self, num_steps: int) -> int:
        return self.warmup + sum(1 for s in self.full if self.warmup <= s < num_steps)

    def config(self) -> dict:
        if self.at:
            return {"warmup_steps": self.warmup, "interval": 0, "reset_steps": (), "full_at": self.at}
        return {"warmup_steps": self.warmup, "interval": 0, "reset_steps": self.full, "full_at": ()}

    def in_sampler_time(self, progress: Sequence[float] | None) -> "Schedule":
        """This schedule with its full steps placed at ``progress[step]`` (rounded down to 1e-4,
        so the same step reaches its point), or as it is where ``progress`` is None."""
        if not progress:
            return self
        return Schedule(self.warmup, self.full, tuple(math.floor(progress[s] * 1e4) / 1e4 for s in self.full))

    def __str__(self) -> str:
        return f"warmup={self.warmup} full={','.join(map(str, self.full)) or '-'}"


def candidate_schedules(num_steps: int, full_counts: Sequence[int], warmups: Sequence[int] = (2, 3),
                        shapes: Sequence[float] = DEFAULT_SHAPES) -> list[Schedule]:
    """For each count ``n`` and warm-up ``w``, the ``n − w`` other full steps at
    ``w − 1 + (N − w + 1)·(j/(n − w + 1))^γ`` for each shape γ (γ > 1: gaps grow along
    the trajectory, where a forecast holds longer), deduplicated."""
    out: dict[Schedule, None] = {}
    for n in full_counts:
        for w in warmups:
            m = n - w
            if w < 1 or m < 0 or n >= num_steps:  # all full: nothing to tune
                continue
            for gamma in shapes:
                steps = []
                for j in range(1, m + 1):
                    s = w - 1 + round((num_steps - w + 1) * (j / (m + 1)) ** gamma)
                    s = max(s, steps[-1] + 1 if steps else w)
                    steps.append(s)
                if steps and steps[-1] >= num_steps:
                    continue
                out[Schedule(w, tuple(steps))] = None
    return list(out)


@dataclass
class StepCountScore:
    """A trial at one of the step counts it is tuned on: full steps, predicted speed-up, PSNR."""

    full_steps: int
    predicted_speedup: float
    psnr: float


@dataclass
class Trial:
    schedule: Schedule
    forecaster: str
    options: dict
    full_steps: int
    predicted_speedup: float
    psnr: float  # tuned on several step counts: the lowest over them (each in ``at_steps``)
    measured_speedup: float | None = None  # timed against the uncached run (tune(timer=...))
    at_steps: dict[int, StepCountScore] = field(default_factory=dict)  # every step count, when several
    refined: bool = False  # fitted, then refined on the final outputs (tune(refine=...))

    @property
    def forecaster_label(self) -> str:
        return self.forecaster + (" (refined)" if self.refined else "")

    def config(self) -> dict:
        """Backend keyword arguments (JSON-ready) of this trial."""
        cfg = {"policy": "taylor", "lite": True, **self.schedule.config(), "forecaster": self.forecaster}
        if self.options:
            cfg["forecaster_options"] = self.options
        cfg["reset_steps"] = list(cfg["reset_steps"])
        cfg["full_at"] = list(cfg["full_at"])
        if not cfg["full_at"]:
            del cfg["full_at"]
        return cfg


@dataclass
class StepCosts:
    """Seconds of one timed run: uncached, all steps full, one step full; and the steps."""

    uncached: float
    all_full: float
    one_full: float
    num_steps: int

    def run_seconds(self, full_steps: int) -> float:
        n = self.num_steps
        if n == 1:
            return self.all_full
        return self.all_full + (n - full_steps) / (n - 1) * (self.one_full - self.all_full)

    def speedup(self, full_steps: int) -> float:
        return self.uncached / self.run_seconds(full_steps)


@dataclass
class OtherSteps:
    """Another step count a tuned config must hold at: ``run(batches)`` samples the calibration
    batches at ``num_steps`` steps through the tuned target, ``reference[i]`` is batch ``i``'s
    uncached output at that count, ``costs`` the step costs measured there."""

    num_steps: int
    run: Callable[[Sequence[int]], torch.Tensor]
    reference: Sequence[torch.Tensor]
    costs: StepCosts


def full_steps_at(schedule: Schedule, progress: Sequence[float]) -> int:
    """How many of a trajectory's steps ``schedule`` makes full, the trajectory's steps at
    ``progress`` through the noise schedule (two points the same step reaches make one)."""
    rule = FullStepSchedule(schedule.warmup, None, () if schedule.at else schedule.full, full_at=schedule.at)
    return sum(rule.is_full(i, p, progress[i - 1] if i else None) for i, p in enumerate(progress))


@dataclass
class TuneResult:
    chosen: Trial
    trials: list[Trial]
    costs: StepCosts
    request: dict
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return self.chosen.config()

    def save(self, path: str) -> None:
        """The chosen configuration as JSON: ``make_backend(**load_config(path))``-ready.  Tuned
        on several step counts, ``at_steps`` holds the choice's full steps, predicted speed-up
        and PSNR at each (``psnr``: the lowest of them)."""
        chosen = self.chosen
        data = {"config": self.config, "request": self.request, "predicted_speedup": chosen.predicted_speedup,
                "measured_speedup": chosen.measured_speedup, "psnr": chosen.psnr, "costs": asdict(self.costs)}
        if chosen.refined:
            data["refined"] = True
        if chosen.at_steps:
            data["at_steps"] = {str(m): asdict(s) for m, s in chosen.at_steps.items()}
        with open(path, "w") as f:
            json.dump(data, f, indent=2)

    def table(self) -> str:
        from tabulate import tabulate

        rows = sorted(self.trials, key=lambda t: (-t.predicted_speedup, -t.psnr))
        counts = list(next((t.at_steps for t in self.trials if t.at_steps), {}))
        headers = ["", "schedule", "forecaster", "full", "predicted", "measured", "PSNR dB"]
        if counts:
            headers = headers[:-1] + [h for m in counts for h in (f"full@{m}", f"pred.@{m}", f"PSNR@{m}")] + [
                "min PSNR dB"]
        table = []
        for t in rows:
            row = [("*" if t is self.chosen else ""), str(t.schedule), t.forecaster_label, t.full_steps,
                   f"{t.predicted_speedup:.2f}x", "-" if t.measured_speedup is None else f"{t.measured_speedup:.2f}x"]
            for m in counts:
                s = t.at_steps[m]
                row += [s.full_steps, f"{s.predicted_speedup:.2f}x", f"{s.psnr:.2f}"]
            table.append(row + [f"{t.psnr:.2f}"])
        return tabulate(table, headers=headers, tablefmt="github")


def load_config(path: str) -> SpecDiffConfig:
    """The configuration a tune saved (``TuneResult.save``)."""
    with open(path) as f:
        data = json.load(f)
    return SpecDiffConfig(**data.get("config", data))


# ----------------------------------------------------------------------------- re-pointing runtimes
def _backends(target: Any) -> list[SpecDiffBackend]:
    caching = getattr(target, "_specdiff", None)
    return list(caching.backends.values()) if caching is not None else [backend_of(target)]


def configure(target: Any, **changes: Any) -> None:
    """Change the schedule and forecaster of ``target`` (compiled with policy ``taylor``) without
    recompiling: the backends' config (for graphs compiled later) and every live runtime."""
    for backend in _backends(target):
        backend.config = backend.config.replace(**changes)
        cfg = backend.config
        for rt in backend.all_runtimes():
            if isinstance(rt, ForecastRuntime):
                rt.schedule = FullStepSchedule(cfg.warmup_steps, cfg.interval or None, cfg.reset_steps,
                                               full_at=cfg.full_at)
                rt.forecaster, rt.forecaster_options = cfg.forecaster, dict(cfg.forecaster_options)
                rt.reset()


def measure_costs(target: Any, run: Callable[[], Any], uncached_seconds: float, num_steps: int,
                  repeats: int = 3) -> StepCosts:
    """Time ``run()`` with every step full and with one full step (``target`` re-pointed),
    alternating the two so a slow spell of a shared machine hits both; the fastest of
    ``repeats`` each (interference only ever adds time)."""
    all_full = dict(warmup_steps=num_steps, interval=0, reset_steps=(), full_at=(), forecaster="taylor",
                    forecaster_options={})
    one_full = dict(warmup_steps=1, interval=0, reset_steps=(), full_at=())
    best = {}
    for i in range(repeats + 1):  # the first round warms up (compiles), untimed
        for name, changes in (("all", all_full), ("one", one_full)):
            configure(target, **changes)
            start = time.perf_counter()
            run()
            if i:
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    costs = StepCosts(uncached_seconds, best["all"], best["one"], num_steps)
    if costs.all_full > 1.25 * uncached_seconds:
        log.warning("specdiff tune: a run with every step full took %.2fx the uncached run; timings look disturbed, "
                    "predicted speed-ups will be low", costs.all_full / uncached_seconds)
    return costs


def tune(target: Any, run: Callable[[Sequence[int]], torch.Tensor], reference: Sequence[torch.Tensor],
         costs: StepCosts, *, speedup: float | None = None, min_psnr: float | None = None,
         fit_batches: Sequence[int] = (0,), eval_batches: Sequence[int] = (1,),
         schedules: Sequence[Schedule] | None = None, full_counts: Sequence[int] | None = None,
         forecasters: Sequence[tuple[str, dict]] = DEFAULT_FORECASTERS,
         timer: Callable[[], float] | None = None, timed: int = 4,
         other_steps: Sequence[OtherSteps] = (), refine: int = 0) -> TuneResult:
    """Try schedules × forecasters on ``target`` (compiled with policy ``taylor``, lite) and
    choose: with ``speedup``, the best PSNR among trials predicted at least that fast (within
    ``SPEED_SLACK``); with
    ``min_psnr``, the fastest at or above it (without ``full_counts``: counts tried from the
    fewest full steps up, stopping one count past the first that reaches it).  ``run(batches)`` runs the given calibration
    batches through ``target`` and returns their outputs concatenated; ``reference[i]`` is
    batch ``i``'s uncached output.  ``target`` is left configured with the choice.

    ``timer()``, if given, times ``target`` as configured against the uncached run and returns the
    measured speed-up; then up to ``timed`` leading candidates are timed (see the module
    docstring) and the choice goes by measured speed.

    ``other_steps``: more step counts every candidate is scored at (the module docstring); the
    calls must carry timesteps (the schedule has to be placed in the sampler's time).

    ``refine``: the best ``refine`` fitted trials of each group of candidates scored together (a
    full-step count, or ``schedules``) are refined on the fit batches' final outputs
    (:func:`specdiff_fx.calibrate.refine_forecaster`), each a trial of its own, scored on the
    evaluation batches like the rest.  It costs a few hundred cached runs of the fit batches
    per refined trial."""
    if (speedup is None) == (min_psnr is None):
        raise ValueError("tune: ask for exactly one of speedup= or min_psnr=")
    if set(fit_batches) & set(eval_batches):
        raise ValueError("tune: fit and evaluation batches must differ (a fit scored on its own data flatters it)")
    if refine < 0:
        raise ValueError(f"tune: refine must be >= 0 (fitted trials to refine per group), got {refine}")
    n = costs.num_steps
    want = torch.cat([reference[i] for i in eval_batches])
    trials: list[Trial] = []
    progress = step_progress(target, n)
    if progress is None:  # no trajectory ran yet (costs given, not measured): one all-full run shows the timesteps
        configure(target, warmup_steps=n, interval=0, reset_steps=(), full_at=(), forecaster="taylor",
                  forecaster_options={})
        run(fit_batches)
        progress = step_progress(target, n)
    if progress is None:
        if other_steps:
            raise ValueError("tune: the calls carry no timesteps, so a schedule cannot be placed in the sampler's "
                             "time and scored at other step counts; tune each step count on its own")
        log.warning("specdiff tune: the calls carry no timesteps to place the schedule in the sampler's time; "
                    "the chosen config is in step indices and holds at %d steps only", n)
    others = []  # (other step count, its steps' progress, the reference of its evaluation batches)
    for other in other_steps:
        if other.num_steps == n or other.num_steps in [o.num_steps for o, _, _ in others]:
            raise ValueError(f"tune: step count {other.num_steps} given twice")
        configure(target, warmup_steps=other.num_steps, interval=0, reset_steps=(), full_at=(), forecaster="taylor",
                  forecaster_options={})
        other.run(fit_batches)  # all full: shows this count's timesteps
        steps = step_progress(target, other.num_steps)
        if steps is None:
            raise ValueError(f"tune: no trajectory of {other.num_steps} steps with timesteps ran")
        others.append((other, steps, torch.cat([other.reference[i] for i in eval_batches])))

    def fit_runs() -> list[torch.Tensor]:
        return [run(fit_batches)] + [o.run(fit_batches) for o, _, _ in others]

    fit_reference = [torch.cat([reference[i] for i in fit_batches])] + [
        torch.cat([o.reference[i] for i in fit_batches]) for o, _, _ in others]

    def evaluate(sched: Schedule, name: str, options: dict, refined: bool = False) -> Trial:
        """The target as configured, scored on the evaluation batches (at every step count)."""
        full = sched.full_steps(n)
        trial = Trial(sched, name, options, full, costs.speedup(full), psnr(run(eval_batches), want), refined=refined)
        if others:
            trial.at_steps[n] = StepCountScore(full, trial.predicted_speedup, trial.psnr)
            for other, steps, other_want in others:
                m_full = full_steps_at(sched, steps)
                trial.at_steps[other.num_steps] = StepCountScore(
                    m_full, other.costs.speedup(m_full), psnr(other.run(eval_batches), other_want))
            trial.psnr = min(s.psnr for s in trial.at_steps.values())
        log.info("specdiff tune: %s %s%s: %.2fx predicted, %.2f dB%s", sched, name, " (refined)" if refined else "",
                 trial.predicted_speedup, trial.psnr, " (lowest over the step counts)" if others else "")
        return trial

    def score(scheds: Sequence[Schedule]) -> None:
        fitted: list[Trial] = []
        for sched in scheds:
            sched = sched.in_sampler_time(progress)
            for name, options in forecasters:
                configure(target, forecaster="taylor", forecaster_options={}, **sched.config())
                if FORECASTERS[name].fitted:
                    table = fit_forecaster(target, fit_runs, sampler_time=bool(sched.at))
                    options = ({"coefficients_at": table} if sched.at else
                               {"coefficients": {int(k): list(v) for k, v in table.items()}})
                else:
                    configure(target, forecaster=name, forecaster_options=dict(options))
                trials.append(evaluate(sched, name, options))
                if FORECASTERS[name].fitted:
                    fitted.append(trials[-1])
        for t in sorted(fitted, key=lambda t: -t.psnr)[:refine]:
            _apply(target, t)
            options = refine_forecaster(target, fit_runs, fit_reference)
            trials.append(evaluate(t.schedule, t.forecaster, options, refined=True))

    if schedules is not None:
        score(schedules)
    elif speedup is not None:  # counts that can reach the request, and one or two more for quality
        counts = full_counts or [c for c in range(3, n) if 1.0 < costs.speedup(c)]
        counts = [c for c in counts if costs.speedup(c) >= speedup * (1 - SPEED_SLACK)] or [min(counts)]
        score(candidate_schedules(n, sorted(counts)[-3:]))
    elif full_counts:
        score(candidate_schedules(n, full_counts))
    else:  # fewest full steps first: stop one count after the first that reaches the quality
        reached = None
        for c in (c for c in range(3, n) if 1.0 < costs.speedup(c)):
            score(candidate_schedules(n, [c]))
            if reached is None and any(t.psnr >= min_psnr for t in trials):
                reached = c
            elif reached is not None:
                break
    if speedup is not None:
        request = {"speedup": speedup}
        chosen, notes = _choose_for_speed(target, trials, speedup, timer, timed)
    else:
        request = {"min_psnr": min_psnr}
        chosen, notes = _choose_for_quality(target, trials, min_psnr, timer, timed)
    if others:
        request["steps"] = [n] + [o.num_steps for o, _, _ in others]
    if refine:
        request["refine"] = refine
    _apply(target, chosen)
    return TuneResult(chosen, trials, costs, request, notes)


def _apply(target: Any, trial: Trial) -> None:
    """Re-point ``target`` at ``trial``: its schedule, forecaster and options (none: cleared)."""
    cfg = trial.config()
    cfg.setdefault("full_at", ())
    configure(target, forecaster_options=cfg.pop("forecaster_options", {}),
              **{k: (tuple(v) if k in ("reset_steps", "full_at") else v) for k, v in cfg.items()
                 if k not in ("policy", "lite")})


def step_progress(target: Any, num_steps: int) -> list[float] | None:
    """The progress through the noise schedule of each step of the latest complete trajectory a
    forecasting runtime of ``target`` ran (runtime/schedule.py), or None where none ran
    ``num_steps`` steps with timesteps."""
    for backend in _backends(target):
        for rt in backend.all_runtimes():
            if isinstance(rt, ForecastRuntime) and sorted(rt.progress.timesteps) == list(range(num_steps)):
                return rt.progress.steps()
    return None


class _Timing:
    """Measured speed-ups of trials, and the measured/predicted ratio that rescales the others."""

    def __init__(self, target: Any, timer: Callable[[], float] | None) -> None:
        self.target, self.timer, self.ratios = target, timer, []

    def speed(self, t: Trial) -> float:
        """The best estimate: measured if timed, else the prediction rescaled by the ratios so far."""
        if t.measured_speedup is not None:
            return t.measured_speedup
        scale = sorted(self.ratios)[len(self.ratios) // 2] if self.ratios else 1.0
        return t.predicted_speedup * scale

    def measure(self, t: Trial) -> float:
        _apply(self.target, t)
        t.measured_speedup = float(self.timer())
        self.ratios.append(t.measured_speedup / t.predicted_speedup)
        log.info("specdiff tune: %s %s: %.2fx measured (%.2fx predicted)", t.schedule, t.forecaster,
                 t.measured_speedup, t.predicted_speedup)
        return t.measured_speedup


def _choose_for_speed(target, trials, speedup, timer, timed) -> tuple[Trial, list[str]]:
    """The best PSNR whose speed (measured, or predicted and rescaled) reaches ``speedup``."""
    timing, floor, notes = _Timing(target, timer), speedup * (1 - SPEED_SLACK), []
    for _ in range(timed if timer is not None else 0):
        ok = [t for t in trials if timing.speed(t) >= floor]
        leader = max(ok, key=lambda t: (t.psnr, -timing.speed(t))) if ok else None
        if leader is None or leader.measured_speedup is not None:
            break
        timing.measure(leader)
    ok = [t for t in trials if timing.speed(t) >= floor and (timer is None or t.measured_speedup is not None)]
    if ok:
        return max(ok, key=lambda t: (t.psnr, -timing.speed(t))), notes
    fastest = max(trials, key=lambda t: (timing.speed(t), t.psnr))
    notes.append(f"no trial reaches {speedup}x (fastest {timing.speed(fastest):.2f}x"
                 f"{' measured' if fastest.measured_speedup is not None else ' predicted'}); chose the fastest")
    return fastest, notes


def _choose_for_quality(target, trials, min_psnr, timer, timed) -> tuple[Trial, list[str]]:
    """The fastest (measured, for the ``timed`` fastest by prediction) at or above ``min_psnr``."""
    ok = [t for t in trials if t.psnr >= min_psnr]
    if not ok:
        return max(trials, key=lambda t: (t.psnr, t.predicted_speedup)), [
            f"no trial reaches {min_psnr} dB (best {max(t.psnr for t in trials):.2f}); chose the best"]
    if timer is None:
        return max(ok, key=lambda t: (t.predicted_speedup, t.psnr)), []
    timing = _Timing(target, timer)
    for t in sorted(ok, key=lambda t: (-t.predicted_speedup, -t.psnr))[:timed]:
        timing.measure(t)
    return max((t for t in ok if t.measured_speedup is not None), key=lambda t: (t.measured_speedup, t.psnr)), []


# ----------------------------------------------------------------------------- a user's own pipeline
def tune_pipeline(pipe: Any, calls: Sequence[dict], *, speedup: float | None = None, psnr: float | None = None,
                  timed: int = 2, repeats: int = 2, **tune_kwargs: Any) -> TuneResult:
    """Tune policy ``taylor``'s schedule and forecaster on a user's own requests of ``pipe``.

    ``calls``: keyword arguments of ``pipe(...)``, at least two, all with the same
    ``num_inference_steps``: the first half fits the ``fitted`` forecaster, the rest score every
    candidate (a fit scored on its own calls would flatter it).  A call's ``generator`` is reset
    to its state before every run (one is seeded by the call's index where none is given), so
    each candidate sees the same noise.  ``pipe`` comes from ``compile_pipeline(pipe,
    policy="taylor")`` (compiled here with the defaults if it is not) and is left on the choice;
    ``TuneResult.save`` writes a config ``compile_pipeline(pipe, load_config(path))`` reads, in
    the sampler's time.

    The reference is the same pipeline with every step full (what the uncached pipeline
    computes); its time is the uncached time, so the speed-ups are measured against a
    trajectory that also records Taylor terms, a few percent slower than a plain compile:
    they err low."""
    from .pipeline import compile_pipeline

    if len(calls) < 2:
        raise ValueError("tune_pipeline: give at least two calls (the first half fits, the rest score)")
    steps = {call.get("num_inference_steps") for call in calls}
    if len(steps) != 1 or None in steps:
        raise ValueError("tune_pipeline: every call needs the same num_inference_steps (got "
                         f"{sorted(steps, key=str)}); tune once per step count, or use the saved config's full_at")
    n = int(steps.pop())
    if getattr(pipe, "_specdiff", None) is None:
        compile_pipeline(pipe, policy="taylor")
    for backend in _backends(pipe):
        if backend.config.policy != "taylor":
            raise ValueError(f"tune_pipeline needs policy 'taylor', this pipeline has {backend.config.policy!r}")

    prepared = []
    for i, call in enumerate(calls):
        call = dict(call)
        generator = call.get("generator")
        if generator is None:
            generator = call["generator"] = torch.Generator().manual_seed(i)
        call.setdefault("output_type", "pt")
        prepared.append((call, generator, generator.get_state()))

    def one(i: int) -> torch.Tensor:
        call, generator, state = prepared[i]
        generator.set_state(state)
        with torch.no_grad():
            out = pipe(**call)
        for name in ("images", "frames"):
            if hasattr(out, name):
                out = getattr(out, name)
                break
        else:
            out = out[0]
        return torch.as_tensor(out).float().flatten()

    def run_all() -> None:
        for i in range(len(prepared)):
            one(i)

    configure(pipe, warmup_steps=n, interval=0, reset_steps=(), full_at=(), forecaster="taylor", forecaster_options={})
    run_all()  # warm-up: compiles, and shows the sampler's timesteps
    start = time.perf_counter()
    raw = [one(i) for i in range(len(prepared))]
    uncached = time.perf_counter() - start
    # PSNR on a common range: each call's reference scaled to [-1, 1] (latents have no fixed range)
    ranges = [(float(r.min()), max(float(r.max() - r.min()), 1e-12)) for r in raw]

    def scaled(i: int, x: torch.Tensor) -> torch.Tensor:
        lo, span = ranges[i]
        return 2.0 * (x - lo) / span - 1.0

    reference = [scaled(i, r) for i, r in enumerate(raw)]

    def run(batches: Sequence[int]) -> torch.Tensor:
        return torch.cat([scaled(i, one(i)) for i in batches])

    def timer() -> float:
        start = time.perf_counter()
        run_all()
        return uncached / (time.perf_counter() - start)

    costs = measure_costs(pipe, run_all, uncached, n, repeats=repeats)
    half = len(prepared) // 2
    return tune(pipe, run, reference, costs, speedup=speedup, min_psnr=psnr, fit_batches=list(range(half)),
                eval_batches=list(range(half, len(prepared))), timer=timer if timed else None, timed=timed,
                **tune_kwargs)
