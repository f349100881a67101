"""Schedules in the sampler's time (runtime/schedule.py): progress from timesteps, and ``full_at``
points that make the same steps of a trajectory full at any step count or timestep scale."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from specdiff_fx import SpecDiffConfig
from specdiff_fx.runtime.schedule import CACHED_STEP, FULL_STEP, PARTIAL_STEP, FullStepSchedule, progress, reaches


def falling(num_steps: int, scale: float = 1000.0, shift: float = 1.0) -> list[float]:
    """The timesteps a flow-matching sampler hands its model: 1 → 0 (not including 0), shifted."""
    out = []
    for i in range(num_steps):
        t = 1.0 - i / num_steps
        out.append(scale * shift * t / (1 + (shift - 1) * t))
    return out


def full_steps(schedule: FullStepSchedule, timesteps: list[float], rising: bool = False) -> list[int]:
    steps, previous = [], None
    for i, t in enumerate(timesteps):
        p = progress(t, timesteps[0], rising)
        if schedule.is_full(i, p, previous):
            steps.append(i)
        previous = p
    return steps


@pytest.mark.parametrize("scale", [1000.0, 1.0])
def test_progress_reads_falling_timesteps_on_either_scale(scale):
    ts = falling(28, scale)
    assert progress(ts[0], ts[0], False) == 0.0
    assert progress(ts[7], ts[0], False) == pytest.approx(0.25)
    assert progress(0.0, ts[0], False) == 1.0


def test_progress_reads_rising_timesteps_and_clamps():
    ts = [i / 10 for i in range(10)]  # Lumina2 passes 1 - t: rising from 0
    assert progress(ts[3], ts[0], True) == pytest.approx(0.3)
    assert progress(-5.0, 999.0, False) == 1.0 and progress(1200.0, 999.0, False) == 0.0


def test_reaches_is_the_first_step_at_or_past_a_point():
    assert reaches((0.25,), None, 0.3) and not reaches((0.25,), None, 0.1)  # a first step: every point below it
    assert reaches((0.25,), 0.2, 0.25) and not reaches((0.25,), 0.25, 0.3)
    assert reaches((0.25,), 0.2, 0.25 - 1e-9)  # float rounding of the timestep
    assert not reaches((0.25, 0.5), 0.3, 0.45)


@pytest.mark.parametrize("num_steps", [20, 28, 50])
def test_full_at_puts_each_point_at_the_first_step_that_reaches_it(num_steps):
    points = (5 / 28, 9 / 28, 14 / 28, 20 / 28)
    schedule = FullStepSchedule(warmup_steps=3, interval=None, full_at=points)
    expected = sorted({0, 1, 2} | {math.ceil(u * num_steps - 1e-9) for u in points})
    for scale in (1000.0, 1.0):
        assert full_steps(schedule, falling(num_steps, scale)) == expected
    if num_steps == 28:  # a schedule tuned at 28 steps in indices is the same schedule at 28 steps
        assert expected == [0, 1, 2, 5, 9, 14, 20]


def test_full_at_follows_the_schedulers_shift_and_an_img2img_start():
    points = (0.5,)
    schedule = FullStepSchedule(warmup_steps=1, interval=None, full_at=points)
    shifted = falling(28, shift=3.0)  # SD3's shift spends more steps at high noise
    steps = full_steps(schedule, shifted)
    k = steps[1]
    assert progress(shifted[k], shifted[0], False) >= 0.5 > progress(shifted[k - 1], shifted[0], False)
    assert k > 14  # half the noise is gone later than half the steps
    # img2img at strength 0.6: the trajectory starts at t = 600; the point is still the step reaching 0.5
    start = [600.0 - 600.0 * i / 17 for i in range(17)]
    steps = full_steps(schedule, [t for t in start])
    assert len(steps) == 2 and progress(start[steps[1]], 1000.0, False) >= 0.5
    # ... though its first timestep is below 1000: progress counts from the 0..1000 scale, not from it
    assert progress(600.0, 600.0, False) == pytest.approx(0.4)


def test_every_point_is_hit_once_even_when_steps_skip_past_several():
    schedule = FullStepSchedule(warmup_steps=1, interval=None, full_at=(0.3, 0.35, 0.8))
    ts = falling(5)  # progress 0, .2, .4, .6, .8: 0.3 and 0.35 both first reached at step 2
    assert full_steps(schedule, ts) == [0, 2, 4]


def test_kind_counts_partial_steps_from_the_runtimes_last_full_step():
    schedule = FullStepSchedule(warmup_steps=1, interval=None, partial_every=2, full_at=(0.5,))
    assert schedule.kind(5, 0.55, 0.45) == FULL_STEP
    assert schedule.kind(7, 0.75, 0.65, since_full=2) == PARTIAL_STEP
    assert schedule.kind(7, 0.75, 0.65, since_full=1) == CACHED_STEP


def test_config_checks_and_sorts_full_at():
    assert SpecDiffConfig(full_at=[0.7, 0.2, 0.7]).full_at == (0.2, 0.7)
    for bad in ([0.0], [1.0], [-0.1], ["x"], 0.5):
        with pytest.raises(ValueError, match="full_at"):
            SpecDiffConfig(full_at=bad)


# ----------------------------------------------------------------------------- through real pipelines
def _full_steps_run(case) -> list[int]:
    from specdiff_fx import get_runtime

    plan = get_runtime(getattr(case.pipe, case.denoisers[0])).stats()["plan"]
    return [e["step"] for e in plan if e["calls"][0] == "full"]


@pytest.mark.parametrize("name", ["flux", "sd3", "sd15"])
def test_full_at_lands_on_the_first_step_past_each_point_at_any_step_count(name):
    """FLUX shifts its sigmas by image size, SD3 by a fixed shift, SD 1.5's PNDM hands integer
    timesteps: in each, the full step is the first whose scheduler timestep is past the point."""
    from tiny_pipelines import build_pipeline

    from specdiff_fx import compile_pipeline, restore_pipeline

    case = build_pipeline(name)
    compile_pipeline(case.pipe, policy="taylor", compiler="eager", dynamic=False, warmup_steps=1, interval=0,
                     full_at=(0.3, 0.6))
    try:
        for n in (6, 10):
            case(0, num_inference_steps=n)
            # one timestep per scheduler step (SD 1.5's PNDM lists its second one twice: two steps)
            timesteps = [float(t) for t in case.pipe.scheduler.timesteps]
            reached = [1 - t / 1000 for t in timesteps]
            expected = {0} | {next(i for i, p in enumerate(reached) if p >= u - 1e-6) for u in (0.3, 0.6)}
            assert _full_steps_run(case) == sorted(expected), (n, reached)
    finally:
        restore_pipeline(case.pipe)


def test_a_sampler_time_fit_serves_other_step_counts_and_warns_outside_them():
    from tiny_pipelines import build_pipeline

    from specdiff_fx import compile_pipeline, fit_forecaster, get_runtime, restore_pipeline

    case = build_pipeline("sd3")
    schedule = dict(warmup_steps=2, interval=0, full_at=(0.5,))
    compile_pipeline(case.pipe, policy="taylor", compiler="eager", dynamic=False, **schedule)
    try:
        taylor = case(0, num_inference_steps=8)
        table = fit_forecaster(case.pipe, lambda: [case(s, num_inference_steps=n) for s, n in ((1, 6), (2, 10))],
                               sampler_time=True)
        assert table["step_counts"] == [6, 10]
        assert table["progress"] == sorted(table["progress"]) and len(table["progress"]) >= 6
        runtime = get_runtime(case.pipe.transformer)
        assert runtime.stats()["forecaster"] == "fitted"
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # 8 steps lie inside 6..10: no warning
            fitted = case(0, num_inference_steps=8)
        assert torch.isfinite(fitted).all() and not torch.equal(fitted, taylor)
        assert runtime.stats()["cached_steps"] > 0
        with pytest.warns(RuntimeWarning, match=r"ran 11 steps, outside the step counts .*\[6, 10\]"):
            case(0, num_inference_steps=14)
    finally:
        restore_pipeline(case.pipe)


def test_full_at_on_a_clock_without_timesteps_says_so_once(capture):
    """A block frame whose scheduler lists no timesteps has no progress: full_at cannot place its
    points, and the runtime says so (its warm-up and reset steps still run full)."""
    from specdiff_fx import make_backend
    from specdiff_fx.runtime.step_tracker import StepEvent
    from specdiff_fx.testing.tiny_models import build_tiny

    case = build_tiny("dit", layers=1)
    gm, inputs = capture(case.model, case.make_inputs(batch=1, timestep=500.0))
    runtime = make_backend(policy="fora", compiler="eager", full_at=(0.5,)).build_runtime(gm, inputs)
    blind = [StepEvent(trajectory=0, step=s, slot=0, timestep=float("nan"), new_trajectory=s == 0, new_step=True)
             for s in range(3)]
    with pytest.warns(RuntimeWarning, match="full_at needs each call's timestep"):
        assert runtime._progress(blind[0]) == (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert runtime._progress(blind[1]) == (None, None)  # once
