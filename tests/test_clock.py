"""The denoising clock: inferred from inputs on the raw path (runtime/step_tracker.py), told by the
pipeline through compile_pipeline (runtime/pipeline_clock.py)."""

import pytest
import torch

from specdiff_fx.runtime import PipelineClock, StepTracker
from specdiff_fx.runtime.step_tracker import MAX_CALL_SLOTS


class _User:
    """Stands for a runtime (the clock keys its per-runtime state weakly)."""


def _latents(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, generator=g) for _ in range(n)]


def _events(tracker, calls):
    return [(e.trajectory, e.step, e.slot) for e in (tracker.observe(t, x) for t, x in calls)]


def test_heun_repeats_are_steps():
    a, b, c, d, e, f = _latents(6)
    # FlowMatchHeun: t0, t1, t1, t2, t2 (each evaluation at new latents), then a new call
    got = _events(StepTracker(), [(1000, a), (800, b), (800, c), (600, d), (600, e), (1000, f)])
    assert got == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0), (0, 4, 0), (1, 0, 0)]


def test_pndm_repeat_of_its_second_timestep_is_a_step():
    a, b, c, d, e = _latents(5)
    got = _events(StepTracker(), [(1000, a), (900, b), (900, c), (800, d), (700, e)])
    assert got == [(0, s, 0) for s in range(5)]


def test_true_cfg_calls_share_latents_and_are_slots():
    a, b, c = _latents(3)
    got = _events(StepTracker(), [(1000, a), (1000, a), (800, b), (800, b), (600, c), (600, c)])
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]


def test_heun_with_separate_cfg_calls():
    a, b, c, d = _latents(4)
    got = _events(StepTracker(), [(1000, a), (1000, a), (800, b), (800, b), (800, c), (800, c), (600, d)])
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (0, 3, 0)]


def test_equal_values_in_a_new_tensor_count_as_the_same_latents():
    a, b = _latents(2)
    got = _events(StepTracker(), [(1000, a), (1000, a.clone()), (800, b), (800, b.clone())])
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]


def test_series_of_one_step_calls_are_trajectories_with_bounded_slots():
    calls = [(1000, x) for x in _latents(8)]
    tracker = StepTracker()
    events = [tracker.observe(t, x) for t, x in calls]
    # the second call could still be a second stream; the third shows a series and the count is mended
    assert [e.trajectory for e in events][2:] == list(range(2, 8))
    assert sum(e.new_trajectory + e.skipped for e in events) == 8  # as a runtime counts them
    assert max(e.slot for e in events) <= 1
    assert all(e.step == 0 for e in events)


def test_two_interleaved_streams_get_a_slot_each():
    a, b, c, d, e, f = _latents(6)
    got = _events(StepTracker(), [(1000, a), (1000, b), (800, c), (800, d), (600, e), (600, f)])
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]


def test_same_latents_repeated_at_one_timestep_stays_bounded():
    (a,) = _latents(1)
    tracker = StepTracker()
    events = [tracker.observe(1000, a) for _ in range(20)]
    assert max(e.slot for e in events) == MAX_CALL_SLOTS - 1
    assert sum(e.new_trajectory for e in events) == 20 // MAX_CALL_SLOTS


def test_direction_is_learned_from_the_first_move():
    xs = _latents(6)
    up = _events(StepTracker(), list(zip([0.0, 0.1, 0.2, 0.0, 0.1, 0.2], xs)))
    assert up == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 0), (1, 2, 0)]
    down = _events(StepTracker(), list(zip([1000, 900, 800, 1000, 900, 800], xs)))
    assert down == up
    with pytest.raises(ValueError):
        StepTracker("sideways")


def test_pipeline_clock_events():
    clock = PipelineClock()
    cond, other = _User(), _User()
    assert clock.observe(cond, 1000.0) is None  # no trajectory begun: the runtime infers instead
    clock.begin_trajectory()
    first = clock.observe(cond, 1000.0)
    second = clock.observe(cond, 1000.0)  # "true CFG": a second call of the step
    assert (first.trajectory, first.step, first.slot, first.new_trajectory) == (0, 0, 0, True)
    assert (second.step, second.slot, second.new_step) == (0, 1, False)
    clock.end_step()
    clock.end_step()  # Heun: two evaluations, two steps
    late = clock.observe(other, 800.0)  # a denoiser that joins at the pipeline's step 2
    assert (late.trajectory, late.step, late.new_trajectory) == (0, 0, True)
    assert clock.observe(cond, 800.0).step == 2
    clock.begin_trajectory()
    again = clock.observe(cond, 800.0)  # a refine call that starts below where the last ended
    assert (again.trajectory, again.step, again.new_trajectory) == (1, 0, True)


def test_pipeline_clock_without_steps_stays_bounded():
    clock = PipelineClock()
    clock.begin_trajectory()
    user = _User()
    events = [clock.observe(user, 500.0) for _ in range(40)]
    assert events[-1] is None and max(e.slot for e in events if e is not None) < 2 * MAX_CALL_SLOTS


# timesteps real pipelines pass (tests/tiny_pipelines.py): none of them is doubted
REAL_SCHEDULES = {
    "sd3": [1000.0, 900.359, 751.121, 502.985, 8.929],
    "sd3_heun": [1000.0, 857.692, 857.692, 602.151, 602.151, 8.929, 8.929],
    "sd15_pndm": [801.0, 601.0, 601.0, 401.0, 201.0, 1.0],
    "pixart_dpm": [999.0, 799.0, 599.0, 400.0, 200.0],
    "flux": [1.0, 0.864, 0.704, 0.513, 0.284],
    "lumina2": [0.0, 0.04, 0.1, 0.2, 0.4],
}


@pytest.mark.parametrize("name", sorted(REAL_SCHEDULES))
def test_real_schedules_are_one_trajectory_without_doubt(name):
    timesteps = REAL_SCHEDULES[name]
    tracker = StepTracker()
    events = [tracker.observe(t, x) for t, x in zip(timesteps, _latents(len(timesteps)))]
    assert [(e.trajectory, e.step) for e in events] == [(0, i) for i in range(len(timesteps))]
    assert all(e.doubt is None for e in events)


@pytest.mark.parametrize("refine", [[0.284], [0.2, 0.1]])
def test_a_refine_call_after_a_full_one_is_doubted(refine):
    """The raw path's blind spot: a call starting at or just below where the last ended continues
    the old trajectory as far as the inputs show; the event says why it may not."""
    full = REAL_SCHEDULES["flux"]
    tracker = StepTracker()
    events = [tracker.observe(t, x) for t, x in zip(full + refine, _latents(len(full) + len(refine)))]
    assert events[len(full)].trajectory == 0 and events[len(full)].doubt is not None


# Karras-type and second-order schedulers (sd15 config, 5 steps): their last moves shrink toward 0
# and KDPM2A repeats its timesteps to 1e-6; none of that is a new call
OTHER_SCHEDULES = {
    "dpm_karras": [999.0, 786.0, 427.0, 59.0, 0.0],
    "kdpm2": [999.0, 885.208, 749.25, 632.229, 499.5, 371.383, 249.75, 21.275, 0.0],
    "kdpm2_ancestral": [999.0, 749.25, 749.2496, 499.5, 499.4997, 249.75, 249.7498, 0.0, 0.0],
}


@pytest.mark.parametrize("name", sorted(OTHER_SCHEDULES))
def test_shrinking_and_near_repeated_schedules_are_not_doubted(name):
    timesteps = OTHER_SCHEDULES[name]
    tracker = StepTracker()
    events = [tracker.observe(t, x) for t, x in zip(timesteps, _latents(len(timesteps)))]
    assert [e.trajectory for e in events] == [0] * len(timesteps)
    assert all(e.doubt is None for e in events), [e.doubt for e in events]
