"""Graph breaks inside the model: the frame with the timestep leads, frames without it follow
its steps (runtime/step_tracker.py: StepClock), so caching still works on such models and never
follows another model's steps."""

import warnings

import pytest
import torch

from specdiff_fx import get_runtime, make_backend
from specdiff_fx.runtime import ClockFollower, StepClock, StepTracker
from specdiff_fx.testing.tiny_models import TinyCase, build_tiny

from helpers import TIMESTEPS_10, assert_all_close, hook_reference, run_steps


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ff = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                      torch.nn.Linear(2 * width, width))

    def forward(self, h):
        return h + self.ff(h)


class BrokenDenoiser(torch.nn.Module):
    """Time embedding, then a graph break (as diffusers' ``.tolist()`` makes), then residual blocks
    in a frame that never sees the timestep."""

    def __init__(self, width=8, layers=2):
        super().__init__()
        self.temb = torch.nn.Linear(1, width)
        self.transformer_blocks = torch.nn.ModuleList(Block(width) for _ in range(layers))
        self.out = torch.nn.Linear(width, width)

    def forward(self, hidden_states, timestep):
        temb = self.temb(timestep[:, None] / 1000.0)
        torch._dynamo.graph_break()
        h = hidden_states + temb[:, None]
        for block in self.transformer_blocks:
            h = block(h)
        return self.out(h)


def broken_case(seed=0):
    torch.manual_seed(seed)
    model = BrokenDenoiser().eval()

    def make_inputs(batch=2, timestep=500.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, 6, 8, generator=g), timestep=torch.full((batch,), timestep))

    return TinyCase("broken", model, make_inputs)


def compile_broken(model, **config):
    backend = make_backend(**config)
    return torch.compile(model, backend=backend, dynamic=False), backend


def test_tracker_direction_up():
    tracker = StepTracker("up")
    events = [tracker.observe(t) for t in (0.0, 0.1, 0.2, 0.0, 0.1)]
    assert [(e.trajectory, e.step) for e in events] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert events[1].timestep == 0.1
    with pytest.raises(ValueError):
        StepTracker("sideways")


def test_follower_follows_its_leader_only():
    clock, tracker = StepClock(), StepTracker()
    leader, other = object(), object()
    follower = ClockFollower(clock, leader)
    assert follower.event() is None  # nothing published yet
    clock.publish(leader, tracker.observe(1000.0))
    first, second = follower.event(), follower.event()  # a frame run twice in one call: two slots
    assert (first.step, second.step) == (0, 0) and first.slot != second.slot
    assert first.new_step and not second.new_step
    clock.publish(leader, tracker.observe(900.0))
    assert follower.event().step == 1
    clock.publish(other, StepTracker().observe(500.0))  # another model's step
    assert follower.event() is None


def test_fora_caches_the_blocks_after_a_graph_break():
    case = broken_case()
    model, _ = compile_broken(case.model, policy="fora", compiler="eager", warmup_steps=2, interval=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_steps(case, model, TIMESTEPS_10)
    # the time-embedding frame has no blocks, but the model caches: no false alarm, an INFO line
    assert not [w for w in caught if "without caching" in str(w.message)]
    assert any(f["fallback"] == "no residual branches found in the graph" for f in get_runtime(model).frames())
    follower = get_runtime(model)
    stats = follower.stats()
    assert stats["fallback"] is None and stats["branches"] == 2
    plan = [e["calls"][0] for e in stats["plan"]]
    assert plan == ["full", "full", "full", "reuse", "reuse", "full", "reuse", "reuse", "full", "reuse"]
    want = hook_reference(case, ("ff",), TIMESTEPS_10, plan)
    assert_all_close(got, want)
    assert not torch.allclose(got[3], run_steps(case, case.model, TIMESTEPS_10)[3])
    # a second trajectory starts with full steps again: it never reads the first one's caches
    run_steps(case, model, TIMESTEPS_10)
    assert get_runtime(model).stats()["trajectories"] == 2
    assert [e["calls"][0] for e in get_runtime(model).stats()["plan"]][:3] == ["full"] * 3


def test_two_models_on_one_backend_keep_separate_caches():
    """Two models of one class compiled with one backend share dynamo's graphs (parameters are
    graph inputs); each model gets a runtime of its own (its frames follow its own leader frame),
    so each model's outputs equal its own hook reference and get_runtime works for both."""
    a, b = broken_case(0), broken_case(1)
    backend = make_backend(policy="fora", compiler="eager", warmup_steps=2, interval=3)
    model_a = torch.compile(a.model, backend=backend, dynamic=False)
    model_b = torch.compile(b.model, backend=backend, dynamic=False)
    got_a, got_b = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for t in TIMESTEPS_10:
                got_a.append(model_a(**a.make_inputs(timestep=t)))
                got_b.append(model_b(**b.make_inputs(timestep=t)))
    assert not [w for w in caught if "without caching" in str(w.message)]  # the models cache
    plan_a = get_runtime(model_a).stats()["plan"]
    plan_b = get_runtime(model_b).stats()["plan"]
    assert get_runtime(model_a).primary is not get_runtime(model_b).primary
    assert all(len(e["calls"]) == 1 for e in plan_a + plan_b)
    assert len(plan_a) == len(plan_b) == 10
    assert_all_close(got_a, hook_reference(a, ("ff",), TIMESTEPS_10, [e["calls"][0] for e in plan_a]))
    assert_all_close(got_b, hook_reference(b, ("ff",), TIMESTEPS_10, [e["calls"][0] for e in plan_b]))
    assert "reuse" in plan_a[3]["calls"] and "reuse" in plan_b[3]["calls"]


@pytest.mark.slow
def test_lumina2_runs_fora_across_its_graph_break():
    """Lumina2: `.tolist()` on the mask breaks the graph, and its timestep counts up."""
    case = build_tiny("lumina2")
    model, _ = compile_broken(case.model, policy="fora", compiler="eager", timestep_direction="up")
    plain = run_steps(case, case.model, TIMESTEPS_10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            got = run_steps(case, model, TIMESTEPS_10)
    # its frames without blocks are INFO lines and rows of the frames table: the model caches
    assert not [w for w in caught if "without caching" in str(w.message)]
    stats = get_runtime(model).stats()
    assert any(f["fallback"] for f in stats["frames"])
    assert stats["fallback"] is None and stats["cached_steps"] > 0 and stats["trajectories"] == 3
    assert_all_close(got[:3], plain[:3])  # warm-up 0, 1 and step 2 are full
    assert not torch.allclose(got[3], plain[3])
    assert all(torch.isfinite(g).all() for g in got)


@pytest.mark.slow
def test_hidream_runs_fora_in_block_frames():
    """HiDream: the MoE's ``bincount().cpu().numpy()`` makes dynamo skip the model's forward and
    trace each block's ``forward`` as a frame of its own, one graph per block kind run once per
    block.  Those frames follow the timestep-embedding frame's steps; their attention residuals
    (adds owned by the frame's root, residual_branches.find_residual_branches) are reused, each
    block with a runtime of its own (the blocks' parameters are the frame's inputs), and equal a
    hook reference that replays ``attn1``."""
    case = build_tiny("hidream", layers=2)
    model, backend = compile_broken(case.model, policy="fora", compiler="eager", warmup_steps=2, interval=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_steps(case, model, TIMESTEPS_10)
    # the embedder and expert frames have no branches, the block frames cache: no false alarm
    assert not [w for w in caught if "without caching" in str(w.message)]
    cached = [r for r in (ref() for ref, _ in backend._runtimes) if r is not None and r.fallback is None]
    assert len(cached) == 2  # the double-stream and the single-stream block frame
    for runtime in cached:
        stats = runtime.stats()
        assert stats["branch_kinds"] == {"self_attention": runtime.stats()["branches"]}
        assert len(runtime.all_runtimes()) == 2  # two blocks share each frame, each with its own state
        for block in runtime.all_runtimes():
            assert [len(e["calls"]) for e in block.stats()["plan"]] == [1] * 10
    plan = [e["calls"][0] for e in cached[0].stats()["plan"]]
    assert plan == ["full", "full", "full", "reuse", "reuse", "full", "reuse", "reuse", "full", "reuse"]
    # one view of the model: a caching frame first, every frame in stats() and report()
    view = get_runtime(model)
    stats = view.stats()
    assert stats["fallback"] is None and stats["cached_steps"] > 0
    assert any(f["fallback"] for f in stats["frames"]) and sum(f["fallback"] is None for f in stats["frames"]) >= 2
    assert "frames (graphs this model compiled to" in view.report()
    want = hook_reference(case, ("block.attn1",), TIMESTEPS_10, plan,
                          lists=("double_stream_blocks", "single_stream_blocks"))
    assert_all_close(got, want)
    assert not torch.allclose(got[3], run_steps(case, case.model, TIMESTEPS_10)[3])
