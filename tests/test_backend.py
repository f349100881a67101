"""End-to-end behaviour of the backend under the eager compiler (fast); see test_inductor.py."""

import warnings

import pytest
import torch

from specdiff_fx import SpecDiffConfig, get_runtime, make_backend, specdiff_backend
from specdiff_fx.testing.tiny_models import build_tiny

from helpers import HOOKED_MODULES, TIMESTEPS_10, PlainMLP, assert_all_close, compile_with, hook_reference, run_steps

FAMILIES = ["dit", "pixart", "sd3", "flux", "unet"]


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad,match", [
    (dict(policy="nope"), "policy"),
    (dict(compiler="tvm"), "compiler"),
    (dict(interval=-1), "interval"),
    (dict(warmup_steps=0), "warmup_steps"),
    (dict(cache_ratio=1.0), "cache_ratio"),
    (dict(c2_share=-0.1), "c2_share"),
    (dict(score_lambda=-1), "score_lambda"),
    (dict(draft_steps=-1), "draft_steps"),
    (dict(draft_update=3), "draft_update"),
    (dict(reset_steps=(-1,)), "reset_steps"),
    (dict(importance_queries=0), "importance_queries"),
    (dict(importance_sites=True), "importance_sites"),
    (dict(importance_query_stride=0), "importance_query_stride"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SpecDiffConfig(**bad)


def test_config_schedule_defaults_follow_the_policy():
    fora = SpecDiffConfig(policy="fora")
    spec = fora.replace(policy="specdiff")
    assert (fora.warmup_steps, fora.interval) == (2, 3)
    assert (spec.warmup_steps, spec.reset_steps) == (3, (14,))
    assert SpecDiffConfig(policy="specdiff", warmup_steps=2).warmup_steps == 2


def test_make_backend_overrides_and_unknown_fields():
    assert make_backend(interval=5).config.interval == 5
    with pytest.raises(TypeError, match="unknown"):
        make_backend(intervall=5)


def test_registered_under_name_specdiff():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("specdiff") is specdiff_backend


# ----------------------------------------------------------------------------- off == original
@pytest.mark.parametrize("family", FAMILIES)
def test_policy_off_matches_original(family):
    case = build_tiny(family)
    compiled, _ = compile_with(case.model, policy="off", compiler="eager")
    ts = TIMESTEPS_10[:3]
    assert_all_close(run_steps(case, compiled, ts), run_steps(case, case.model, ts))
    assert get_runtime(compiled).stats()["cached_steps"] == 0


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_fora_with_interval_one_is_all_full_and_exact(family):
    case = build_tiny(family)
    compiled, _ = compile_with(case.model, policy="fora", interval=1, warmup_steps=1, compiler="eager")
    ts = TIMESTEPS_10[:4]
    assert_all_close(run_steps(case, compiled, ts), run_steps(case, case.model, ts))
    assert get_runtime(compiled).stats()["full_steps"] == 4


# ----------------------------------------------------------------------------- reuse == hook reference
@pytest.mark.parametrize("family", sorted(HOOKED_MODULES))
def test_reuse_steps_match_hook_reference(family):
    case = build_tiny(family)
    cfg = dict(policy="fora", warmup_steps=1, interval=2, compiler="eager")
    compiled, _ = compile_with(case.model, **cfg)
    ts = TIMESTEPS_10[:6]
    ours = run_steps(case, compiled, ts)
    plan = [e["calls"][0] for e in get_runtime(compiled).stats()["plan"]]
    assert plan == ["full", "full", "reuse", "full", "reuse", "full"]

    assert_all_close(ours, hook_reference(case, HOOKED_MODULES[family], ts, plan))
    # and the cached steps really differ from an uncached run (the test can fail)
    uncached = run_steps(case, case.model, ts)
    assert not torch.allclose(ours[2], uncached[2], atol=1e-4)


# ----------------------------------------------------------------------------- no recompiles
@pytest.mark.parametrize("family", ["dit", "flux"])
def test_no_recompiles_over_three_trajectories(family):
    from torch._dynamo.utils import counters

    case = build_tiny(family)
    compiled, backend = compile_with(case.model, policy="fora", compiler="eager")
    for seed in range(3):
        run_steps(case, compiled, TIMESTEPS_10, seed=seed)
    assert counters["stats"]["unique_graphs"] == 1
    assert len([r for r, _ in backend._runtimes if r() is not None]) == 1
    s = get_runtime(compiled).stats()
    assert (s["trajectories"], s["steps"]) == (3, 30)
    assert s["cached_steps"] > 0


# ----------------------------------------------------------------------------- cache isolation
def _alone(case, ts, seed, batch=2, model=None):
    torch._dynamo.reset()
    model = case.model if model is None else model
    compiled, _ = compile_with(model, policy="fora", warmup_steps=1, interval=3, compiler="eager")
    return run_steps(case, compiled, ts, seed=seed, batch=batch)


def test_interleaved_trajectories_match_running_alone():
    case = build_tiny("dit")
    ts = TIMESTEPS_10[:8]
    alone_a, alone_b = _alone(case, ts, 1), _alone(case, ts, 2)
    torch._dynamo.reset()
    compiled, _ = compile_with(case.model, policy="fora", warmup_steps=1, interval=3, compiler="eager")
    got_a, got_b = [], []
    with torch.no_grad():
        for t in ts:
            got_a.append(case.output(compiled(**case.make_inputs(timestep=t, seed=1))).clone())
            got_b.append(case.output(compiled(**case.make_inputs(timestep=t, seed=2))).clone())
    assert_all_close(got_a, alone_a)
    assert_all_close(got_b, alone_b)
    assert get_runtime(compiled).stats()["cached_steps"] > 0


def test_offset_interleaving_never_reads_the_other_trajectory():
    """A starts, B starts two steps later: the runtime cannot tell them apart by timestep,
    so it must recompute rather than read a cache written for the other trajectory."""
    case = build_tiny("dit")
    ts = TIMESTEPS_10[:6]
    exact = {(s, t): o for s in (1, 2) for t, o in zip(ts, run_steps(case, case.model, ts, seed=s))}
    compiled, _ = compile_with(case.model, policy="fora", warmup_steps=1, interval=2, compiler="eager")
    order = [(1, ts[0]), (1, ts[1]), (2, ts[0]), (1, ts[2]), (2, ts[1]), (1, ts[3]), (2, ts[2])]
    with torch.no_grad():
        for seed, t in order:
            out = case.output(compiled(**case.make_inputs(timestep=t, seed=seed)))
            kind = get_runtime(compiled).stats()["plan"][-1]["calls"][-1]
            if kind == "full":
                torch.testing.assert_close(out, exact[(seed, t)], atol=1e-5, rtol=1e-5)
            else:  # a reuse is only legal when this very trajectory wrote the cache
                pytest.fail(f"seed {seed} t={t} reused a cache across interleaved trajectories")


def test_resolution_change_midway_matches_running_alone():
    case = build_tiny("dit", sample=8)
    big = build_tiny("dit", sample=16)  # only its input maker: 16x16 latents for the same model
    ts = TIMESTEPS_10[:8]
    alone_small = _alone(case, ts, 1)
    alone_big = _alone(big, ts, 1, model=case.model)
    torch._dynamo.reset()
    compiled, _ = compile_with(case.model, policy="fora", warmup_steps=1, interval=3, compiler="eager")
    with torch.no_grad():
        first = [case.output(compiled(**case.make_inputs(timestep=t, seed=1))).clone() for t in ts[:4]]
        other = [case.output(compiled(**big.make_inputs(timestep=t, seed=1))).clone() for t in ts]
        rest = [case.output(compiled(**case.make_inputs(timestep=t, seed=1))).clone() for t in ts[4:]]
    assert_all_close(first + rest, alone_small)
    assert_all_close(other, alone_big)


def test_separate_cond_uncond_calls_match_running_alone():
    case = build_tiny("sd3")
    ts = TIMESTEPS_10[:8]
    alone_cond, alone_uncond = _alone(case, ts, 1, batch=1), _alone(case, ts, 2, batch=1)
    torch._dynamo.reset()
    compiled, _ = compile_with(case.model, policy="fora", warmup_steps=1, interval=3, compiler="eager")
    cond, uncond = [], []
    with torch.no_grad():
        for t in ts:
            cond.append(case.output(compiled(**case.make_inputs(batch=1, timestep=t, seed=1))).clone())
            uncond.append(case.output(compiled(**case.make_inputs(batch=1, timestep=t, seed=2))).clone())
    assert_all_close(cond, alone_cond)
    assert_all_close(uncond, alone_uncond)
    s = get_runtime(compiled).stats()
    assert s["cache_slots"] == 2 and s["cached_steps"] > 0


# ----------------------------------------------------------------------------- fallback
def test_model_without_branches_falls_back_loudly():
    model = PlainMLP()
    compiled, _ = compile_with(model, compiler="eager")
    x, t = torch.randn(2, 8), torch.ones(2, 1)
    # said at the next call: a frame without branches warns only if no other frame of the
    # model caches (Lumina2's embedding frame is no loss), and those compile after it
    with pytest.warns(RuntimeWarning, match="no residual branches") as record:
        out = compiled(x, timestep=t)
        compiled(x, timestep=t * 0.5)
        compiled(x, timestep=t * 0.25)
    assert len([w for w in record if "specdiff" in str(w.message)]) == 1
    torch.testing.assert_close(out, model(x, timestep=t))
    assert get_runtime(compiled).stats()["fallback"] == "no residual branches found in the graph"


def test_model_without_timestep_falls_back_loudly():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    compiled, _ = compile_with(model, compiler="eager")
    # a frame with nothing to cache warns at its next call, if no other frame of the model caches
    with pytest.warns(RuntimeWarning, match="no timestep input") as record:
        compiled(torch.randn(2, 8))
        compiled(torch.randn(2, 8))
    assert len([w for w in record if "specdiff" in str(w.message)]) == 1


def test_internal_error_falls_back_instead_of_breaking_dynamo(monkeypatch):
    import specdiff_fx.backend as backend_mod

    def boom(gm, **_):
        raise RuntimeError("analysis exploded")

    monkeypatch.setattr(backend_mod, "find_residual_branches", boom)
    case = build_tiny("dit")
    compiled, _ = compile_with(case.model, compiler="eager")
    with pytest.warns(RuntimeWarning, match="internal error RuntimeError: analysis exploded"):
        out = run_steps(case, compiled, TIMESTEPS_10[:2])
    assert_all_close(out, run_steps(case, case.model, TIMESTEPS_10[:2]))


def test_a_dynamic_graph_builds_its_variants_with_symbolically_sized_buffers():
    """A dynamic graph (sizes marked dynamic, as ``compile_pipeline(pipe, dynamic=True)`` compiles):
    the variants build on it (no fallback, no warning), their buffers sized in its symbols and
    read off each call.  Caching across sizes through real pipelines: tests/test_serving.py."""
    from specdiff_fx.backend import compile_in_place

    case = build_tiny("dit")
    compile_in_place(case.model, make_backend(compiler="eager"), dynamic=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_steps(case, case.model, TIMESTEPS_10[:2])
    assert not [w for w in record if "specdiff" in str(w.message)]
    runtime = get_runtime(case.model)
    assert runtime.fallback is None and runtime.shape_binding is not None
    assert all(s.symbolic for s in runtime.buffer_specs if s.role == "taylor_term")


def test_get_runtime_errors():
    with pytest.raises(TypeError):
        get_runtime(torch.nn.Linear(2, 2))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="not a specdiff backend"):
        get_runtime(torch.compile(model, backend="eager"))
    compiled, _ = compile_with(torch.nn.Linear(2, 2), compiler="eager")
    with pytest.raises(LookupError):
        get_runtime(compiled)


def test_variant_graphs_are_structured_trace_artifacts():
    import logging

    from torch._logging._internal import trace_log

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(str(getattr(record, "metadata", "")))

    handler = Collect()
    old_level = trace_log.level
    trace_log.addHandler(handler)
    trace_log.setLevel(logging.DEBUG)
    try:
        case = build_tiny("dit")
        compiled, _ = compile_with(case.model, policy="specdiff", compiler="eager")
        run_steps(case, compiled, TIMESTEPS_10[:1])
    finally:
        trace_log.removeHandler(handler)
        trace_log.setLevel(old_level)
    text = "\n".join(records)
    for name in ("specdiff_analysis", "specdiff_full_graph", "specdiff_partial_graph", "specdiff_draft_graph"):
        assert name in text


class _SinusoidalDenoiser(torch.nn.Module):
    """A residual denoiser whose forward takes ``*args`` (as diffusers' ``apply_lora_scale``
    wrapper makes it), so dynamo names the timestep ``L['args'][1]``."""

    def __init__(self, width=8):
        super().__init__()
        self.temb = torch.nn.Linear(width, width)
        self.transformer_blocks = torch.nn.ModuleList(_FFBlock(width) for _ in range(2))

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def _forward(self, hidden_states, t):
        half = hidden_states.shape[-1] // 2
        freqs = torch.exp(-torch.arange(half, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]
        emb = self.temb(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))
        h = hidden_states + emb[:, None]
        for block in self.transformer_blocks:
            h = block(h)
        return h


class _FFBlock(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ff = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))

    def forward(self, h):
        return h + self.ff(h)


def test_positional_timestep_is_found_by_what_it_feeds():
    model = _SinusoidalDenoiser().eval()
    compiled, _ = compile_with(model, policy="fora", compiler="eager", warmup_steps=1, interval=2)
    x = torch.randn(2, 4, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        for t in TIMESTEPS_10[:5]:
            compiled(x, torch.tensor(t).expand(2))
    runtime = get_runtime(compiled)
    assert runtime.timestep_index is not None and "args" in runtime.graphs["original"].graph.find_nodes(
        op="placeholder")[runtime.timestep_index].name
    stats = runtime.stats()
    assert (stats["trajectories"], stats["steps"]) == (1, 5) and stats["cached_steps"] == 2


def test_get_runtime_of_a_module_compiled_in_place():
    case = build_tiny("dit")
    backend = make_backend(policy="fora", compiler="eager")
    case.model.compile(backend=backend, fullgraph=True, dynamic=False)
    try:
        run_steps(case, case.model, TIMESTEPS_10[:4])
        view = get_runtime(case.model)
        assert view.stats()["steps"] == 4 and len(view.stats()["frames"]) == 1
        assert "frames" not in view.report()  # one graph: no frame table
    finally:
        case.model._compiled_call_impl = None
