"""SpecDiff with forecasting: the token forecast variant, per-token Taylor terms in the
runtime (own step stamps, re-based by fresh values), and the mixed full/partial/forecast schedule."""

import pytest
import torch

from specdiff_fx import SpecDiffConfig, get_runtime
from specdiff_fx.passes.graph_queries import is_attention
from specdiff_fx.passes.token_axis import analyze_token_axis
from specdiff_fx.passes.token_forecast import build_token_forecast_variant
from specdiff_fx.passes.token_variants import build_token_record_variant
from specdiff_fx.runtime import FullStepSchedule
from specdiff_fx.passes.token_lines import extrapolate, forecast_line, record_line
from specdiff_fx.testing.tiny_models import build_tiny

from helpers import TIMESTEPS_10, compile_with, run_steps


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_token_forecast_variant_reads_the_ring_and_skips_the_blocks(family, capture):
    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    record, rspecs = build_token_record_variant(gm, region)
    rbufs = [torch.zeros(s.shape, dtype=s.dtype) for s in rspecs]
    with torch.no_grad():
        reference = _first(record(*example, *rbufs))
    exit_features = rbufs[[s.role for s in rspecs].index("history")]
    forecast, specs = build_token_forecast_variant(gm, region)
    assert [s.role for s in specs] == ["mix_weights", "history", "history", "history"]
    assert not any(is_attention(n) for n in forecast.graph.nodes)
    # h0 = the recorded exit, weights [1, 0, 0]: the model's own exit reproduces the output
    ring = [exit_features.clone(), torch.randn_like(exit_features), torch.zeros_like(exit_features)]
    with torch.no_grad():
        out = _first(forecast(*example, torch.tensor([1.0, 0.0, 0.0]), *ring))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ring[2], exit_features)  # written into the oldest entry, like a partial step
    # weights [2, -1, 0]: the line through h1 and h0
    ring = [exit_features.clone(), exit_features * 0.5, torch.zeros_like(exit_features)]
    with torch.no_grad():
        forecast(*example, torch.tensor([2.0, -1.0, 0.0]), *ring)
    torch.testing.assert_close(ring[2], exit_features * 1.5)


def test_per_token_lines_rebase_computed_tokens_at_their_own_stamp():
    """c3="forecast" (passes/token_lines.py): each token's residual is a line; a partial step
    reads every token's line at x and only the tokens it computes start a new one."""
    value, slope, stamp = torch.zeros(2, 6, 3), torch.zeros(2, 6, 3), torch.zeros(2, 6)
    line = lambda x, valid=1.0: torch.tensor([x, valid, 1.0])  # the horizon is for K/V lines only
    f0, f1 = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    record_line(value, slope, stamp, line(0.0, valid=0.0), f0, 1)
    record_line(value, slope, stamp, line(1.0), f1, 1)
    torch.testing.assert_close(slope, f1 - f0)
    torch.testing.assert_close(extrapolate(value, slope, stamp, line(3.0), 1), f1 + 2.0 * (f1 - f0))
    # step 3 computes tokens 0 and 4 of element 0, 1 and 2 of element 1
    index = torch.tensor([[0, 4], [1, 2]])
    rows = torch.arange(2).unsqueeze(1)
    fresh = torch.randn(2, 2, 3)
    read = forecast_line(value, slope, stamp, line(3.0), fresh, index, 1)
    torch.testing.assert_close(read[rows, index], fresh)
    torch.testing.assert_close(read[0, 5], (f1 + 2.0 * (f1 - f0))[0, 5])  # no horizon on token lines
    for b, toks in enumerate(index.tolist()):
        for i in range(6):
            if i in toks:  # new line from the fresh value, slope over its own distance (2 steps)
                torch.testing.assert_close(value[b, i], fresh[b, toks.index(i)])
                torch.testing.assert_close(slope[b, i], (fresh[b, toks.index(i)] - f1[b, i]) / 2.0)
                assert stamp[b, i] == 3.0
            else:  # untouched: same line, same stamp
                torch.testing.assert_close(value[b, i], f1[b, i])
                assert stamp[b, i] == 1.0
    out = extrapolate(value, slope, stamp, line(4.0), 1)
    torch.testing.assert_close(out[0, 4], fresh[0, 1] + 1.0 * (fresh[0, 1] - f1[0, 4]) / 2.0)
    torch.testing.assert_close(out[0, 5], f1[0, 5] + 3.0 * (f1[0, 5] - f0[0, 5]))


def test_kv_lines_forecast_the_uncomputed_entries_and_rebase_the_computed_ones():
    """kv_forecast (passes/token_lines.py): each K/V entry is a line through its last two computed
    values; a partial step reads the forecast (at most ``horizon`` steps out) with its fresh
    entries in place, and only those start anew (their own distance, their own stamp)."""
    record_kv_line = record_line

    def forecast_kv_line(*args):
        return forecast_line(*args, horizon=True)

    cache, slope = torch.zeros(2, 2, 6, 4), torch.zeros(2, 2, 6, 4)   # (batch, heads, tokens, head size)
    stamp = torch.zeros(2, 6)
    k0, k1 = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    line = lambda x, valid=1.0: torch.tensor([x, valid, 2.0])  # horizon 2
    record_kv_line(cache, slope, stamp, line(0.0, valid=0.0), k0, 2)  # a trajectory's first full step
    assert torch.equal(cache, k0) and not slope.any() and not stamp.any()
    record_kv_line(cache, slope, stamp, line(1.0), k1, 2)
    torch.testing.assert_close(slope, k1 - k0)
    assert torch.equal(cache, k1) and (stamp == 1.0).all()
    # x = 5: four steps out, held at the horizon; token 4 computed fresh
    fresh = torch.randn(2, 2, 1, 4)
    read = forecast_kv_line(cache, slope, stamp, line(5.0), fresh, torch.tensor([[4], [4]]), 2)
    others = [0, 1, 2, 3, 5]
    torch.testing.assert_close(read[:, :, others], (k1 + 2.0 * (k1 - k0))[:, :, others])
    torch.testing.assert_close(read[:, :, 4:5], fresh)
    torch.testing.assert_close(slope[:, :, 4:5], (fresh - k1[:, :, 4:5]) / 4.0)  # its own distance
    torch.testing.assert_close(slope[:, :, others], (k1 - k0)[:, :, others])
    torch.testing.assert_close(cache[:, :, 4:5], fresh)
    torch.testing.assert_close(cache[:, :, others], k1[:, :, others])
    assert (stamp[:, 4] == 5.0).all() and (stamp[:, others] == 1.0).all()
    # x = 6: token 4 one step along its new line; element 1 computes token 0, element 0 token 2
    fresh2 = torch.randn(2, 2, 1, 4)
    read = forecast_kv_line(cache, slope, stamp, line(6.0), fresh2, torch.tensor([[2], [0]]), 2)
    torch.testing.assert_close(read[:, :, 4:5], fresh + (fresh - k1[:, :, 4:5]) / 4.0)
    torch.testing.assert_close(read[0, :, 5], (k1 + 2.0 * (k1 - k0))[0, :, 5])
    torch.testing.assert_close(read[0, :, 2], fresh2[0, :, 0])
    torch.testing.assert_close(read[1, :, 0], fresh2[1, :, 0])
    assert stamp[0, 2] == 6.0 and stamp[1, 0] == 6.0 and stamp[0, 0] == 1.0 and stamp[1, 2] == 1.0
    # a full step re-bases every entry over its own distance
    k7 = torch.randn(2, 2, 6, 4)
    record_kv_line(cache, slope, stamp, line(7.0), k7, 2)
    torch.testing.assert_close(slope[0, :, 2], (k7 - fresh2)[0, :, 2] / 1.0)
    torch.testing.assert_close(slope[0, :, 5], (k7 - k1)[0, :, 5] / 6.0)
    torch.testing.assert_close(slope[:, :, 4], (k7[:, :, 4:5] - fresh)[:, :, 0] / 2.0)
    assert (stamp == 7.0).all() and torch.equal(cache, k7)


def test_kv_lines_rewrite_only_the_cache_writes_and_completions(capture):
    """The rewrite replaces every K/V completion of the partial variant and every K/V cache write
    of the record variant, adds the line buffers with shared names, and leaves its inputs alone."""
    from specdiff_fx.buffers import BufferRole
    from specdiff_fx.passes import token_ops
    from specdiff_fx.passes.token_lines import add_kv_lines
    from specdiff_fx.passes.token_variants import build_token_partial_variant

    case = build_tiny("sd3")
    gm, _ = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    record = build_token_record_variant(gm, region)
    partial = build_token_partial_variant(gm, region, 8)
    before = (record[0].code, partial[0].code)
    (rec, rspecs), (part, pspecs) = add_kv_lines(record, partial)
    assert (record[0].code, partial[0].code) == before
    caches = [s.name for s in pspecs if s.role == BufferRole.KV]
    assert len(list(part.graph.find_nodes(op="call_function", target=token_ops.complete_kv))) == 0
    assert len(list(part.graph.find_nodes(op="call_function", target=forecast_line))) == len(caches)
    assert len(list(rec.graph.find_nodes(op="call_function", target=record_line))) == len(caches)
    lines = lambda specs: {s.name: (s.role, s.shape) for s in specs if s.role in (
        BufferRole.LINE, BufferRole.LINE_SLOPE, BufferRole.LINE_STAMP)}
    assert lines(rspecs) == lines(pspecs) and len(lines(pspecs)) == 1 + 2 * len(caches)
    placeholders = [n.name for n in part.graph.find_nodes(op="placeholder")]
    assert placeholders[-len(pspecs):] == [s.name for s in pspecs]


@pytest.mark.parametrize("kv_forecast", [True, False])
def test_kv_forecast_rebases_per_entry(kv_forecast):
    case = build_tiny("dit")
    model, _ = compile_with(case.model, policy="specdiff", compiler="eager", cache_ratio=0.5, c3="forecast",
                            c2_share=0.0, reset_steps=(), warmup_steps=2, kv_forecast=kv_forecast)
    got = run_steps(case, model, TIMESTEPS_10[:5])
    runtime = get_runtime(model)
    s = runtime.stats()
    assert s["kv_forecast"] is kv_forecast and s["kv_horizon"] == 1.0 and s["partial_steps"] == 3
    slot = runtime.slot(0)
    lines = slot.named("line_value", "line_slope", "line_stamp")
    kv_stamps = [t for name, t in lines.items() if name.endswith("_stamp") and "cache" in name]
    if kv_forecast:  # each partial step (2, 3, 4) re-based the entries it computed, only those
        stamps = set(torch.cat([t.flatten() for t in kv_stamps]).unique().tolist())
        assert 4.0 in stamps and len(stamps) > 1 and stamps <= {1.0, 2.0, 3.0, 4.0}
        assert {f"{name}_slope" for name in slot.named("kv")} <= set(lines)
        assert slot.nbytes > 2 * slot.nbytes_of("kv")  # the caches and their slopes (stamps are per token)
    else:
        assert not kv_stamps
    token_stamp = lines["specdiff_token_stamp"]  # c3="forecast": the tokens' own lines
    assert set(token_stamp.unique().tolist()) <= {1.0, 2.0, 3.0, 4.0} and (token_stamp == 4.0).any()
    assert all(torch.isfinite(g).all() for g in got)
    assert SpecDiffConfig(policy="specdiff", c3="forecast").kv_forecast is True  # on with c3="forecast"
    assert SpecDiffConfig(policy="specdiff").kv_forecast is False                # history: nothing to forecast
    with pytest.raises(ValueError, match="needs c3='forecast'"):
        SpecDiffConfig(policy="specdiff", kv_forecast=True)
    with pytest.raises(ValueError, match="kv_horizon"):
        SpecDiffConfig(policy="specdiff", kv_horizon=0)


def test_schedule_mixes_full_partial_and_cached_steps():
    s = FullStepSchedule(warmup_steps=3, interval=None, reset_steps=(9,), partial_every=2)
    assert [s.kind(i) for i in range(13)] == (
        ["full"] * 3 + ["cached", "partial"] * 3 + ["full", "cached", "partial", "cached"])
    assert [FullStepSchedule(2, 3).kind(i) for i in range(6)] == ["full", "full", "full", "cached", "cached", "full"]
    assert all(FullStepSchedule(1, None, partial_every=1).kind(i) == "partial" for i in range(1, 5))


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_specdiff_forecast_trajectory_runs_the_schedule_without_recompiles(family):
    torch._dynamo.utils.counters.clear()
    case = build_tiny(family)
    model, _ = compile_with(case.model, policy="specdiff", compiler="eager", cache_ratio=0.5, c3="forecast",
                            c2_share=0.0, partial_every=2, reset_steps=())
    plain = run_steps(case, case.model, TIMESTEPS_10)
    for _ in range(3):
        got = run_steps(case, model, TIMESTEPS_10)
    s = get_runtime(model).stats()
    assert [e["calls"][0] for e in s["plan"]] == ["full"] * 3 + ["forecast", "partial"] * 3 + ["forecast"]
    assert s["partial_steps"] == 9 and s["forecast_steps"] == 12 and s["c3"] == "forecast"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["recompiles"]
    torch.testing.assert_close(got[2], plain[2])
    for g, p in zip(got, plain):
        assert ((g - p).norm() / p.norm()) < 0.5


def test_specdiff_forecast_zero_cache_ratio_is_the_original():
    case = build_tiny("dit")
    model, _ = compile_with(case.model, policy="specdiff", compiler="eager", cache_ratio=0.0, c3="forecast",
                            c2_share=0.0)
    got = run_steps(case, model, TIMESTEPS_10)
    plain = run_steps(case, case.model, TIMESTEPS_10)
    for g, p in zip(got, plain):
        torch.testing.assert_close(g, p, atol=1e-5, rtol=1e-5)


def test_partial_every_needs_forecast():
    with pytest.raises(ValueError, match="c3='forecast'"):
        SpecDiffConfig(policy="specdiff", partial_every=2)
    with pytest.raises(ValueError, match="partial_every"):
        SpecDiffConfig(policy="specdiff", c3="forecast", partial_every=0)


@pytest.mark.parametrize("family", ["dit", "sd3", "flux"])
def test_token_lines_partial_at_the_same_inputs_is_exact(family, capture):
    """Token lines: uncomputed tokens are entry + their line.  With the lines recorded at X, a
    partial step at X reproduces the full output, whatever the subset and the C2 mask; the
    forecast variant (no token computed) at X too."""
    from specdiff_fx.passes.token_lines import add_token_lines
    from specdiff_fx.passes.token_variants import build_token_partial_variant

    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    (record, rspecs), (partial, pspecs), (forecast, fspecs) = add_token_lines(
        region, build_token_record_variant(gm, region), build_token_partial_variant(gm, region, 3),
        build_token_forecast_variant(gm, region, residual=True))
    line = torch.tensor([0.0, 0.0, 1.0])  # x = 0, the trajectory's first full step
    bufs = {s.name: torch.full(s.shape, float("nan"), dtype=s.dtype) for s in rspecs}
    bufs.update({s.name: torch.zeros(s.shape, dtype=s.dtype) for s in rspecs if s.role.startswith("line")})
    bufs["specdiff_line"] = line
    with torch.no_grad():
        reference = _first(record(*example, *(bufs[s.name] for s in rspecs)))
    torch.testing.assert_close(reference, _first(gm(*example)), rtol=0, atol=0)
    assert torch.isfinite(bufs["specdiff_token_value"]).all() and not bufs["specdiff_token_slope"].any()
    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(region.num_tokens, generator=g)[:3] for _ in range(2)])
    given = {"index": index, "reuse_mask": torch.rand(2, region.num_tokens, generator=g) < 0.5,
             "mix_weights": torch.tensor([1.0, 0.0, 0.0])}
    args = [given.get(s.role, bufs.get(s.name, torch.zeros(s.shape, dtype=s.dtype))) for s in pspecs]
    with torch.no_grad():
        out = _first(partial(*example, *args))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    args = [bufs.get(s.name, torch.zeros(s.shape, dtype=s.dtype)) for s in fspecs]
    with torch.no_grad():
        out = _first(forecast(*example, *args))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
