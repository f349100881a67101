import pytest
import torch

from specdiff_fx.runtime import (
    FULL,
    REUSE,
    AlwaysFull,
    BlockEvents,
    BufferSpec,
    CachingRuntime,
    FullStepSchedule,
    PipelineClock,
    Slots,
    StepTracker,
    TimestepEvents,
)


def observe_all(tracker, ts):
    return [(e.trajectory, e.step, e.slot) for e in map(tracker.observe, ts)]


def test_tracker_steps_and_new_trajectories():
    tr = StepTracker()
    assert observe_all(tr, [1000, 900, 800, 1000, 950]) == [
        (0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 0)]


def test_tracker_slots_for_separate_cond_uncond_calls():
    tr = StepTracker()
    assert observe_all(tr, [1000, 1000, 900, 900, 800, 800]) == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]


def test_tracker_restart_at_same_timestep_after_slot_count_is_known():
    tr = StepTracker()
    # two calls per step are learned at the first step change; a third equal call restarts
    events = observe_all(tr, [1000, 1000, 900, 900, 900])
    assert events[-1] == (1, 0, 0)


def test_tracker_invalidate_starts_new_trajectory():
    tr = StepTracker()
    tr.observe(1000)
    tr.observe(900)
    tr.invalidate()
    assert tr.observe(800).new_trajectory


def test_schedule():
    s = FullStepSchedule(warmup_steps=2, interval=3, reset_steps=(6,))
    assert [s.is_full(i) for i in range(9)] == [True, True, True, False, False, True, True, False, True]
    assert all(AlwaysFull().is_full(i) for i in range(5))


def test_cache_slots_are_separate_and_stamped():
    spec = BufferSpec("c0", "branch_cache", (2, 3), torch.float32, torch.device("cpu"))
    slots = Slots(policy_state=list)
    assert slots[0].buffers([spec])[0] is not slots[1].buffers([spec])[0]
    assert slots[0].buffer(spec) is slots[0].buffers([spec])[0]  # allocated once, found by its spec
    assert not slots[0].valid_for(0)
    slots[0].stamp(0, 0)
    assert slots[0].valid_for(0) and not slots[0].valid_for(1)
    assert slots.nbytes == 2 * 2 * 3 * 4
    slots[0].policy_state.append("written")
    slots[0].invalidate()  # the stamp and the policy's state go; the buffer stays, unread
    assert not slots[0].valid_for(0) and slots[0].policy_state == []
    assert slots.nbytes == 2 * 2 * 3 * 4


class Recorder:
    """Fake compiled variants: write the timestep into the cache on full, read it on reuse."""

    def __init__(self):
        self.calls = []

    def full(self, x, t, cache):
        self.calls.append(FULL)
        cache.copy_(x * t)
        return x * t

    def reuse(self, x, t, cache):
        self.calls.append(REUSE)
        return cache.clone()


def make_runtime(schedule=FullStepSchedule(1, 2), **kw):
    rec = Recorder()
    spec = BufferSpec("c0", "branch_cache", (2,), torch.float32, torch.device("cpu"))
    rt = CachingRuntime(
        policy="fora", variants={FULL: rec.full, REUSE: rec.reuse}, buffer_specs=[spec],
        schedule=schedule, timestep_index=1, signature_indices=[0],
        example_inputs=[torch.ones(2), torch.tensor(1.0)], **kw,
    )
    return rt, rec


def test_runtime_follows_schedule_and_counts():
    rt, rec = make_runtime()
    x = torch.ones(2)
    outs = [rt(x, torch.tensor(t)) for t in (4.0, 3.0, 2.0, 1.0)]
    assert rec.calls == [FULL, FULL, REUSE, FULL]
    assert torch.equal(outs[2], torch.full((2,), 3.0))  # the value stored at step 1
    s = rt.stats()
    assert (s["steps"], s["full_steps"], s["cached_steps"], s["trajectories"]) == (4, 3, 1, 1)
    assert [e["calls"] for e in s["plan"]] == [[FULL], [FULL], [REUSE], [FULL]]
    assert "latest trajectory" in rt.report()


@pytest.mark.parametrize("warmup, length, warns", [
    (3, 3, True),     # 3-step trajectories inside the warm-up: the inferred clock may be splitting a longer one
    (14, 14, False),  # every step of 14-step trajectories full, as the schedule asks (a tuner's reference run)
])
def test_an_inferred_clock_that_caches_nothing_warns_unless_the_schedule_asked_for_it(warmup, length, warns):
    import warnings

    rt, rec = make_runtime(schedule=FullStepSchedule(warmup, None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5 if length == 3 else 2):
            for t in range(length, 0, -1):
                rt(torch.ones(2), torch.tensor(float(t)))
        rt(torch.ones(2), torch.tensor(float(length)))  # the next trajectory's first call checks the last
    said = [str(w.message) for w in caught if "none cached" in str(w.message)]
    assert rt.clock_source == "inferred" and rt.stats()["cached_steps"] == 0 and set(rec.calls) == {FULL}
    assert len(said) == (1 if warns else 0), said


def test_runtime_never_reads_a_cache_from_another_signature():
    rt, rec = make_runtime()
    rt(torch.ones(2), torch.tensor(4.0))
    rt(torch.ones(2), torch.tensor(3.0))
    # a new input signature mid-trajectory (here: dtype) must not read the old caches
    rt(torch.ones(2, dtype=torch.float64), torch.tensor(2.0))
    assert rec.calls[-1] == FULL
    assert rt.stats()["invalidations"] == 1


def test_runtime_reset():
    rt, rec = make_runtime()
    for t in (4.0, 3.0):
        rt(torch.ones(2), torch.tensor(t))
    rt.reset()
    assert rt.stats()["steps"] == 0
    rt(torch.ones(2), torch.tensor(2.0))
    assert rec.calls[-1] == FULL


def test_runtime_needs_a_full_variant():
    with pytest.raises(ValueError, match="full"):
        CachingRuntime(policy="fora", variants={REUSE: lambda *a: None})


def test_buffers_for_is_what_the_variant_was_called_with():
    rt, rec = make_runtime()
    rt(torch.ones(2), torch.tensor(4.0))
    (cache,) = rt.buffers_for(FULL, 0)
    assert torch.equal(cache, torch.full((2,), 4.0))  # written by the full call of slot 0
    assert rt.buffers_for(REUSE, 0)[0] is cache and rt.slot(0).buffer(rt.buffer_specs_for(FULL)[0]) is cache
    assert rt.buffers_for(FULL, 1)[0] is not cache
    with pytest.raises(KeyError, match="partial"):
        rt.buffers_for("partial", 0)


def test_the_event_source_is_chosen_when_the_runtime_is_built():
    rt, _ = make_runtime()
    assert isinstance(rt.events, TimestepEvents) and rt.stats()["clock"] is None
    rt(torch.ones(2), torch.tensor(4.0))
    assert rt.stats()["clock"] == "inferred"
    block = CachingRuntime(policy="fora", variants={FULL: lambda *a: None}, pipeline_clock=PipelineClock())
    assert isinstance(block.events, BlockEvents)
    plain = CachingRuntime(policy="fora", variants={FULL: lambda *a: None})
    assert plain.events is None
