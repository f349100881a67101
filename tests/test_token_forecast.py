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
from specdiff_fx.buffers import BufferSpec
from specdiff_fx.runtime.token_runtime import TokenSlot
from specdiff_fx.tiny_models import build_tiny

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


def _slot(batch=2, n=6, width=3):
    def spec(name, role, shape, dtype=torch.float32, ring=None):
        return BufferSpec(name, role, shape, dtype, torch.device("cpu"), ring=ring)

    record = [spec("specdiff_history_out", "history", (batch, n, width), ring=2),
              spec("imp", "importance", (batch, n))]
    partial = [spec("idx", "index", (batch, 2), torch.long), spec("mask", "reuse_mask", (batch, n), torch.bool),
               spec("w", "mix_weights", (3,))]
    return TokenSlot(record, partial, [])


def test_per_token_terms_rebase_computed_tokens_at_their_own_stamp():
    slot = _slot()
    f0 = torch.randn(2, 6, 3)
    slot.record_all(f0, 0.0)
    f1 = torch.randn(2, 6, 3)
    slot.record_all(f1, 1.0)
    torch.testing.assert_close(slot.slope, f1 - f0)
    out = torch.empty_like(f1)
    slot.forecast_into(out, 3.0)
    torch.testing.assert_close(out, f1 + 2.0 * (f1 - f0))
    # step 3 computes tokens 0 and 4 of element 0, 1 and 2 of element 1
    index = torch.tensor([[0, 4], [1, 2]])
    fresh = torch.randn(2, 6, 3)
    slot.record_subset(fresh, index, 3.0)
    for b, toks in enumerate(index.tolist()):
        for i in range(6):
            if i in toks:  # new line from the fresh value, slope over its own distance (2 steps)
                torch.testing.assert_close(slot.value[b, i], fresh[b, i])
                torch.testing.assert_close(slot.slope[b, i], (fresh[b, i] - f1[b, i]) / 2.0)
                assert slot.stamp[b, i] == 3.0
            else:  # untouched: same line, same stamp
                torch.testing.assert_close(slot.value[b, i], f1[b, i])
                assert slot.stamp[b, i] == 1.0
    slot.forecast_into(out, 4.0)
    torch.testing.assert_close(out[0, 4], fresh[0, 4] + 1.0 * (fresh[0, 4] - f1[0, 4]) / 2.0)
    torch.testing.assert_close(out[0, 5], f1[0, 5] + 3.0 * (f1[0, 5] - f0[0, 5]))


def test_kv_lines_forecast_the_uncomputed_entries_and_rebase_the_computed_ones():
    """kv_forecast: each K/V entry is a line through its last two computed values; a partial step
    reads the forecast (at most ``kv_horizon`` steps out) and the entries it wrote start anew."""
    slot = _slot()
    slot.kv = {"k0": torch.zeros(2, 2, 6, 4)}           # (batch, heads, tokens, head size)
    slot.kv_horizon = 2.0
    k0, k1 = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    slot.kv["k0"].copy_(k0)
    slot.record_kv(0.0)
    slot.kv["k0"].copy_(k1)
    slot.record_kv(1.0)
    torch.testing.assert_close(slot.kv_slope["k0"], k1 - k0)
    slot.forecast_kv(2.0)                                  # one step out
    torch.testing.assert_close(slot.kv["k0"], k1 + (k1 - k0))
    slot.forecast_kv(5.0)                                  # four steps out: held at the horizon
    torch.testing.assert_close(slot.kv["k0"], k1 + 2.0 * (k1 - k0))
    # a partial step at 3 computes token 4 of every row (the variant writes it over the forecast)
    slot.forecast_kv(3.0)
    fresh = torch.randn(2, 2, 4)
    slot.kv["k0"][:, :, 4] = fresh
    slot.rebase_kv(3.0)
    torch.testing.assert_close(slot.kv_value["k0"][:, :, 4], fresh)
    torch.testing.assert_close(slot.kv_slope["k0"][:, :, 4], (fresh - k1[:, :, 4]) / 2.0)
    assert (slot.kv_stamp["k0"][:, :, 4] == 3.0).all()
    others = [0, 1, 2, 3, 5]
    torch.testing.assert_close(slot.kv_value["k0"][:, :, others], k1[:, :, others])
    assert (slot.kv_stamp["k0"][:, :, others] == 1.0).all()
    slot.forecast_kv(4.0)
    torch.testing.assert_close(slot.kv["k0"][:, :, 4], fresh + (fresh - k1[:, :, 4]) / 2.0)
    torch.testing.assert_close(slot.kv["k0"][:, :, 0], k1[:, :, 0] + 2.0 * (k1 - k0)[:, :, 0])
    # a full step re-bases every entry at once
    k4 = torch.randn(2, 2, 6, 4)
    slot.kv["k0"].copy_(k4)
    slot.record_kv(4.0)
    assert (slot.kv_stamp["k0"] == 4.0).all()
    torch.testing.assert_close(slot.kv_slope["k0"][:, :, 0], (k4 - k1)[:, :, 0] / 3.0)


@pytest.mark.parametrize("kv_forecast", [True, False])
def test_kv_forecast_rebases_per_entry(kv_forecast):
    case = build_tiny("dit")
    model, _ = compile_with(case.model, policy="specdiff", compiler="eager", cache_ratio=0.5, c3="forecast",
                            c2_share=0.0, reset_steps=(), warmup_steps=2, kv_forecast=kv_forecast)
    got = run_steps(case, model, TIMESTEPS_10[:5])
    runtime = get_runtime(model)
    s = runtime.stats()
    assert s["kv_forecast"] is kv_forecast and s["kv_horizon"] == 1.0 and s["partial_steps"] == 3
    slot = runtime.token_slots[0]
    if kv_forecast:  # each partial step (2, 3, 4) re-based the entries it computed, only those
        stamps = set(torch.cat([t.flatten() for t in slot.kv_stamp.values()]).unique().tolist())
        assert 4.0 in stamps and len(stamps) > 1 and stamps <= {1.0, 2.0, 3.0, 4.0}
        assert slot.nbytes > 3 * slot.kv_bytes
    else:
        assert not slot.kv_value
    assert all(torch.isfinite(g).all() for g in got)
    assert SpecDiffConfig(c3="forecast").kv_forecast is False  # opt-in (docs/forecasting.md)
    with pytest.raises(ValueError, match="needs c3='forecast'"):
        SpecDiffConfig(kv_forecast=True)
    with pytest.raises(ValueError, match="kv_horizon"):
        SpecDiffConfig(kv_horizon=0)


def test_schedule_mixes_full_partial_and_cached_steps():
    s = FullStepSchedule(warmup_steps=3, interval=None, reset_steps=(9,), partial_every=2)
    assert [s.kind(i) for i in range(13)] == (
        ["full"] * 3 + ["cached", "partial"] * 3 + ["full", "cached", "partial", "cached"])
    assert [FullStepSchedule(2, 3).kind(i) for i in range(6)] == ["full", "full", "full", "cached", "cached", "full"]
    assert all(FullStepSchedule(1, None, partial_every=1).kind(i) == "partial" for i in range(1, 5))
    with pytest.raises(ValueError):
        FullStepSchedule(partial_every=0)


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
def test_residual_form_partial_at_the_same_inputs_is_exact(family, capture):
    """Residual form: uncomputed tokens are entry + history_0.  With history_0 = exit − entry
    recorded at X, a partial step at X reproduces the full output, whatever the subset."""
    from specdiff_fx.passes.token_forecast import forecast_residuals
    from specdiff_fx.passes.token_variants import build_token_partial_variant

    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    record, rspecs = forecast_residuals(*build_token_record_variant(gm, region), region)
    assert rspecs[-1].role == "entry"
    rbufs = {s.name: torch.full(s.shape, float("nan"), dtype=s.dtype) for s in rspecs}
    with torch.no_grad():
        reference = _first(record(*example, *rbufs.values()))
    torch.testing.assert_close(reference, _first(gm(*example)), rtol=0, atol=0)
    exit_features, entry = rbufs["specdiff_history_out"], rbufs["specdiff_entry_out"]
    assert torch.isfinite(entry).all()
    partial, pspecs = forecast_residuals(*build_token_partial_variant(gm, region, 3), region)
    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(region.num_tokens, generator=g)[:3] for _ in range(2)])
    bufs = []
    for s in pspecs:
        if s.role == "index":
            bufs.append(index)
        elif s.role == "reuse_mask":
            bufs.append(torch.ones(s.shape, dtype=torch.bool))
        elif s.role == "mix_weights":
            bufs.append(torch.tensor([1.0, 0.0, 0.0]))
        elif s.role == "history":
            bufs.append(exit_features - entry if s.ring == 0 else torch.zeros(s.shape))
        elif s.role == "entry":
            bufs.append(torch.zeros(s.shape))
        else:
            bufs.append(rbufs[s.name].clone())
    with torch.no_grad():
        out = _first(partial(*example, *bufs))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bufs[[s.role for s in pspecs].index("entry")], entry)
