"""Policy ``taylor``: forecast variants (pass level) and the forecast runtime (trajectory level).

The trajectory reference is built with forward hooks, independently of the graph rewrite:
each branch module records its output at full steps and, at forecast steps, returns the
Taylor extrapolation of its recorded outputs.
"""

import pytest
import torch

from specdiff_fx import get_runtime
from specdiff_fx.passes.forecast_variants import (
    FORECAST_TAG,
    ForecastError,
    build_forecast_record_variant,
    build_forecast_variant,
    forecast_input_specs,
)
from specdiff_fx.passes.graph_queries import is_attention
from specdiff_fx.passes.residual_branches import find_residual_branches
from specdiff_fx.testing.tiny_models import build_tiny

from helpers import HOOKED_MODULES, TIMESTEPS_10, assert_all_close, compile_with, run_steps, stack_forecast_reference

FAMILIES = ["dit", "pixart", "sd3", "flux", "unet"]


def _run(gm, args):
    with torch.no_grad():
        out = gm(*args)
    return out[0] if isinstance(out, (tuple, list)) else out


def _buffers(specs):
    return [torch.full(s.shape, float("nan"), dtype=s.dtype) for s in specs]


def _set_coef(buffers, values):
    buffers[-2].copy_(torch.tensor(values, dtype=torch.float32))


# ----------------------------------------------------------------------------- pass level
@pytest.mark.parametrize("order", [1, 2])
def test_record_updates_terms_by_divided_differences(order, capture):
    case = build_tiny("dit")
    gm, ex1 = capture(case.model, case.make_inputs(timestep=900.0))
    _, ex2 = capture(case.model, case.make_inputs(timestep=800.0))
    _, ex3 = capture(case.model, case.make_inputs(timestep=700.0))
    branches = find_residual_branches(gm)
    record, specs = build_forecast_record_variant(gm, branches, order)
    before = gm.code
    bufs = _buffers(specs)
    per = order + 1
    for i in range(len(branches)):
        for j in range(per):
            bufs[i * per + j].zero_()
    values = []
    for ex, coef in ((ex1, [0.0, 0.0, 0, 0]), (ex2, [0.5, 0.0, 0, 0]), (ex3, [0.25, 0.1, 0, 0])):
        _set_coef(bufs, coef)
        reference = _run(gm, ex)
        assert torch.equal(_run(record, ex + bufs), reference), "recording must not change the output"
        values.append([bufs[i * per].clone() for i in range(len(branches))])
    assert gm.code == before
    for i in range(len(branches)):
        g1, g2, g3 = (v[i] for v in values)
        d1_old = (g2 - g1) * 0.5
        d1 = (g3 - g2) * 0.25
        torch.testing.assert_close(bufs[i * per + 1], d1)
        if order == 2:
            torch.testing.assert_close(bufs[i * per + 2], (d1 - d1_old) * 0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_forecast_drops_bodies_and_reads_the_formula(family, capture):
    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs())
    branches = find_residual_branches(gm)
    forecast, specs = build_forecast_variant(gm, branches, order=2)
    assert not any(is_attention(n) for n in forecast.graph.nodes)
    assert any(n.meta.get("specdiff") == FORECAST_TAG for n in forecast.graph.nodes)
    # F = cached value, D1 = D2 = 0: the forecast is plain reuse, whatever k is
    record, _ = build_forecast_record_variant(gm, branches, order=2)
    bufs = [torch.zeros(s.shape, dtype=s.dtype) for s in specs]
    _run(record, example + bufs)  # c0 = c1 = 0: F <- g, D1 = D2 = 0
    _set_coef(bufs, [0.0, 0.0, 3.0, 4.5])
    torch.testing.assert_close(_run(forecast, example + bufs), _run(gm, example), atol=1e-5, rtol=1e-5)
    # D1 = D2 = 1 for every branch: the forecast adds exactly a1 + a2 to every cached value
    for i in range(len(branches)):
        bufs[i * 3 + 1].fill_(1.0)
        bufs[i * 3 + 2].fill_(1.0)
    shifted = [b.clone() for b in bufs]
    for i in range(len(branches)):
        shifted[i * 3].add_(3.0 + 4.5)
        shifted[i * 3 + 1].zero_()
        shifted[i * 3 + 2].zero_()
    torch.testing.assert_close(_run(forecast, example + bufs), _run(forecast, example + shifted))


def test_probe_measures_the_forecast_error(capture):
    case = build_tiny("sd3")
    gm, example = capture(case.model, case.make_inputs())
    branches = find_residual_branches(gm)
    first = tuple(b.name for b in branches if b.block == branches[0].block)
    record, specs = build_forecast_record_variant(gm, branches)
    forecast, _ = build_forecast_variant(gm, branches, probe_branches=first)
    # the probe keeps the first block's attention computed
    assert sum(is_attention(n) for n in forecast.graph.nodes) == 1
    bufs = [torch.zeros(s.shape, dtype=s.dtype) for s in specs]
    _run(record, example + bufs)
    _set_coef(bufs, [0.0, 0.0, 1.0, 0.5])
    out = _run(forecast, example + bufs)
    torch.testing.assert_close(out, _run(gm, example), atol=1e-5, rtol=1e-5)
    assert float(bufs[-1]) == pytest.approx(0.0, abs=1e-6), "exact caches: no forecast error"
    index = [b.name for b in branches].index(first[0])
    cached = bufs[index * 2].clone()
    bufs[index * 2 + 1].copy_(cached)  # D1 = F: forecast = F·(1 + k) = 2F at k = 1
    _run(forecast, example + bufs)
    g_abs = cached.abs().sum()
    others = sum(bufs[i * 2].abs().sum() for i, b in enumerate(branches) if b.name in first)
    assert float(bufs[-1]) == pytest.approx(float(g_abs / others), rel=1e-4)


def test_bad_arguments_raise_the_projects_error(capture):
    case = build_tiny("dit")
    gm, _ = capture(case.model, case.make_inputs())
    branches = find_residual_branches(gm)
    with pytest.raises(ForecastError, match="order"):
        forecast_input_specs(gm, branches, order=3)
    with pytest.raises(ForecastError, match="probe"):
        build_forecast_variant(gm, branches, probe_branches=("nope",))
    with pytest.raises(ForecastError, match="no residual branches"):
        forecast_input_specs(gm, [])


# ----------------------------------------------------------------------------- trajectory level
class ForecastReplay:
    """Forward hooks: record branch module outputs at full steps, return their Taylor
    forecast (order 1, x = step index) at forecast steps."""

    def __init__(self, model, names):
        self.mode = "full"
        self.k = 0.0
        self.store: dict[str, list] = {}
        self.handles = []
        for i, blk in enumerate(model.transformer_blocks):
            for name in names:
                mod = getattr(blk, name, None)
                if mod is not None:
                    self.handles.append(mod.register_forward_hook(self._hook(f"{i}.{name}")))

    def _hook(self, key):
        def forecast(outs, step_dist):
            if len(outs) == 1:
                return outs[-1][0]
            (prev, x0), (last, x1) = outs[-2], outs[-1]
            return last + self.k * (last - prev) / (x1 - x0)

        def hook(module, args, output):
            hist = self.store.setdefault(key, [])
            if self.mode == "full":
                hist.append((output, self.x))
                del hist[:-2]
                return None
            if isinstance(output, tuple):
                return tuple(forecast([(o[j], x) for o, x in hist], None) if o is not None else None
                             for j, o in enumerate(output))
            return forecast(hist, None)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def forecast_reference(case, names, timesteps, plan, *, batch=2, seed=0):
    hooks = ForecastReplay(case.model, names)
    last_full = None
    try:
        outs = []
        with torch.no_grad():
            for step, (t, kind) in enumerate(zip(timesteps, plan)):
                hooks.mode, hooks.x = kind, float(step)
                if kind == "full":
                    last_full = step
                hooks.k = float(step - last_full)
                outs.append(case.output(case.model(**case.make_inputs(batch=batch, timestep=t, seed=seed))).clone())
        return outs
    finally:
        hooks.remove()


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3"])
def test_taylor_trajectory_equals_hook_forecast(family):
    case = build_tiny(family)
    model, _ = compile_with(case.model, policy="taylor", lite=False, compiler="eager", warmup_steps=2, interval=3)
    got = run_steps(case, model, TIMESTEPS_10)
    plan = [e["calls"][0] for e in get_runtime(model).stats()["plan"]]
    assert plan == ["full", "full", "full", "forecast", "forecast", "full", "forecast", "forecast", "full",
                    "forecast"]
    want = forecast_reference(case, HOOKED_MODULES[family], TIMESTEPS_10, plan)
    assert_all_close(got, want, atol=1e-4, rtol=1e-4)
    # and the forecast is not a plain reuse: reuse gives other outputs at forecast steps
    reuse, _ = compile_with(build_tiny(family).model, policy="fora", compiler="eager", warmup_steps=2, interval=3)
    reused = run_steps(case, reuse, TIMESTEPS_10)
    assert not torch.allclose(reused[3], got[3], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_runs_every_family_without_recompiles(family):
    torch._dynamo.utils.counters.clear()
    case = build_tiny(family)
    model, _ = compile_with(case.model, policy="taylor", lite=False, compiler="eager", taylor_order=2,
                            forecast_variable="timestep")
    plain = run_steps(case, case.model, TIMESTEPS_10)
    for _ in range(3):
        got = run_steps(case, model, TIMESTEPS_10)
        assert all(torch.isfinite(g).all() for g in got)
    s = get_runtime(model).stats()
    assert s["fallback"] is None and s["trajectories"] == 3
    assert s["cached_steps"] > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["recompiles"]
    assert_all_close(got[:3], plain[:3], atol=1e-5, rtol=1e-5)  # warm-up steps are full


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_taylor_interval_one_is_the_original(family):
    case = build_tiny(family)
    model, _ = compile_with(case.model, policy="taylor", lite=False, compiler="eager", interval=1)
    assert_all_close(run_steps(case, model, TIMESTEPS_10), run_steps(case, case.model, TIMESTEPS_10))


def test_error_estimate_rises_on_a_perturbed_trajectory_and_refreshes():
    """A changed condition mid-way makes the forecast wrong; the probe sees it and the next
    step is full."""
    case = build_tiny("dit")
    cfg = dict(policy="taylor", compiler="eager", warmup_steps=3, interval=20, tolerance=0.6)
    timesteps = [1000.0 - 50.0 * i for i in range(12)]

    def trajectory(model, switch_at=None):
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                inputs = case.make_inputs(timestep=t, seed=0)
                if switch_at is not None and i >= switch_at:
                    inputs["class_labels"] = (inputs["class_labels"] + 5) % 10
                    inputs["hidden_states"] = inputs["hidden_states"] * 3.0
                model(**inputs)
        return get_runtime(model).stats()

    steady_model, _ = compile_with(case.model, **cfg)
    steady = trajectory(steady_model)
    assert steady["error_refreshes"] == 0 and steady["full_steps"] == 4  # warm-up 0-2, interval at 3
    errors = steady["forecast_errors"]
    # on this random-init model the estimate grows with k (0.12 .. 0.43 here), and stays below 0.6
    assert len(errors) == len(timesteps) - 4 - 1 and errors == sorted(errors) and max(errors) < 0.6
    perturbed_model, _ = compile_with(build_tiny("dit").model, **cfg)
    perturbed = trajectory(perturbed_model, switch_at=7)
    plan = perturbed["plan"]
    assert [e["calls"][0] for e in plan[:7]] == ["full"] * 4 + ["forecast"] * 3
    assert plan[8]["calls"][0] == "full" and plan[8]["details"][0]["refresh"]
    assert plan[8]["details"][0]["error"] > 0.6 > max(perturbed["forecast_errors"][:2])
    assert perturbed["error_refreshes"] >= 1


def test_taylor_isolation_new_trajectory_and_separate_slots():
    """Separate cond/uncond calls keep separate terms; a new trajectory never forecasts from
    the old one (its first step is full)."""
    case = build_tiny("dit")
    model, _ = compile_with(case.model, policy="taylor", compiler="eager", warmup_steps=2, interval=3)
    with torch.no_grad():
        for t in TIMESTEPS_10:
            for seed in (0, 1):
                model(**case.make_inputs(timestep=t, seed=seed))
        s = get_runtime(model).stats()
        assert s["cache_slots"] == 2
        assert all(len(e["calls"]) == 2 and len(set(e["calls"])) == 1 for e in s["plan"])
        out = model(**case.make_inputs(timestep=1000.0, seed=0))
    assert get_runtime(model).stats()["plan"][-1]["calls"] == ["full"]
    torch.testing.assert_close(case.output(out), case.output(case.model(**case.make_inputs(timestep=1000.0))))


def test_config_validation():
    from specdiff_fx import SpecDiffConfig

    with pytest.raises(ValueError, match="taylor_order"):
        SpecDiffConfig(policy="taylor", taylor_order=3)
    with pytest.raises(ValueError, match="forecast_variable"):
        SpecDiffConfig(policy="taylor", forecast_variable="sigma")
    with pytest.raises(ValueError, match="tolerance"):
        SpecDiffConfig(policy="taylor", tolerance=-1.0)
    assert SpecDiffConfig(policy="taylor", tolerance=0.1).probe
    assert not SpecDiffConfig(policy="taylor", tolerance=0.1).lite  # lite by default, unless probed
    assert SpecDiffConfig().policy == "taylor" and SpecDiffConfig().lite


# ----------------------------------------------------------------------------- lite
def test_lite_targets_chain_each_stream(capture):
    from specdiff_fx.passes.forecast_variants import ResidualChain, lite_targets

    expected = {"dit": {"image": 4}, "sd3": {"image": 4, "context": 2}, "flux": {"image": 2, "context": 2, "joint": 1}}
    for family, chains in expected.items():
        case = build_tiny(family)
        gm, _ = capture(case.model, case.make_inputs())
        targets = lite_targets(gm, find_residual_branches(gm))
        assert all(isinstance(t, ResidualChain) for t in targets)
        assert {t.stream: len(t.branches) for t in targets} == chains, family
        grouped = lite_targets(gm, find_residual_branches(gm), group_blocks=1)
        assert all(len(t.blocks) == 1 for t in grouped)
    # a UNet ResNet with conv_shortcut changes shape: it stays a per-branch target
    case = build_tiny("unet")
    gm, _ = capture(case.model, case.make_inputs())
    targets = lite_targets(gm, find_residual_branches(gm))
    assert any(not isinstance(t, ResidualChain) for t in targets)
    assert any(isinstance(t, ResidualChain) for t in targets)


def test_lite_chains_follow_the_dataflow_across_stream_labels(capture):
    """Qwen-Image's text branches (``txt_norm1``, ``txt_mlp``) carry the image-stream label.
    Lite chains by dataflow: one chain per stream covers every branch of both blocks, and the
    forecast step computes no block (no attention left)."""
    from specdiff_fx.passes.forecast_variants import ResidualChain, lite_targets

    case = build_tiny("qwen_image")
    gm, _ = capture(case.model, case.make_inputs())
    branches = find_residual_branches(gm)
    assert len(branches) == 8
    targets = lite_targets(gm, branches)
    assert len(targets) == 2 and all(isinstance(t, ResidualChain) for t in targets)
    assert sorted(b for t in targets for b in t.branches) == sorted(b.name for b in branches)
    assert all(t.blocks == ("transformer_blocks.0", "transformer_blocks.1") for t in targets)
    by_name = {b.name: b for b in branches}
    for t in targets:  # each branch leaves the stream where the one before it added back
        links = [by_name[n] for n in t.branches]
        assert t.source == links[0].source and t.output == links[-1].add
        assert all(b.source == a.add for a, b in zip(links, links[1:]))
    forecast, _ = build_forecast_variant(gm, targets)
    assert not any(is_attention(n) for n in forecast.graph.nodes)


@pytest.mark.parametrize("family", ["dit", "qwen_image"])
def test_lite_chains_compose_from_what_earlier_chains_became(family, capture):
    """Cut every block, a chain starts at the previous chain's output, which the forecast
    replaced by ``source + forecast``: it must read that, so every block drops out."""
    from specdiff_fx.passes.forecast_variants import lite_targets

    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs())
    targets = lite_targets(gm, find_residual_branches(gm), group_blocks=1)
    outputs = {t.output for t in targets}
    assert any(t.source in outputs for t in targets), "chains start where others end"
    record, specs = build_forecast_record_variant(gm, targets)
    forecast, _ = build_forecast_variant(gm, targets)
    assert not any(is_attention(n) for n in forecast.graph.nodes)
    bufs = [torch.zeros(s.shape, dtype=s.dtype) for s in specs]
    reference = _run(gm, example)
    assert torch.equal(_run(record, example + bufs), reference)
    _set_coef(bufs, [0.0, 0.0, 2.0, 2.0])  # no difference recorded: forecast = recorded residual
    torch.testing.assert_close(_run(forecast, example + bufs), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lite_record_then_forecast_at_same_inputs(family, capture):
    """Terms recorded at X with no difference yet forecast the recorded residual: the lite
    forecast graph reproduces the original at X with whole blocks removed."""
    from specdiff_fx.passes.forecast_variants import lite_targets

    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs())
    targets = lite_targets(gm, find_residual_branches(gm))
    record, specs = build_forecast_record_variant(gm, targets)
    forecast, _ = build_forecast_variant(gm, targets)
    per_branch, _ = build_forecast_variant(gm, find_residual_branches(gm))
    assert len(forecast.graph.nodes) < len(per_branch.graph.nodes)
    bufs = [torch.zeros(s.shape, dtype=s.dtype) for s in specs]
    reference = _run(gm, example)
    assert torch.equal(_run(record, example + bufs), reference)
    _set_coef(bufs, [0.0, 0.0, 2.0, 2.0])
    torch.testing.assert_close(_run(forecast, example + bufs), reference, atol=1e-5, rtol=1e-5)


def test_lite_trajectory_equals_stack_forecast_reference():
    """DiT: the lite forecast step equals x0 + F + k·D1 on the residual of the whole block stack,
    computed with hooks on the first and last block."""
    case = build_tiny("dit")
    model, _ = compile_with(case.model, policy="taylor", compiler="eager", lite=True, warmup_steps=2, interval=3)
    got = run_steps(case, model, TIMESTEPS_10)
    plan = [e["calls"][0] for e in get_runtime(model).stats()["plan"]]
    want = stack_forecast_reference(case, plan, TIMESTEPS_10, first=0)
    assert plan.count("forecast") == 5  # full at 0, 1, 2, 5, 8
    assert_all_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_lite_runs_every_family_without_recompiles(family):
    torch._dynamo.utils.counters.clear()
    case = build_tiny(family)
    model, _ = compile_with(case.model, policy="taylor", compiler="eager", lite=True)
    for _ in range(3):
        got = run_steps(case, model, TIMESTEPS_10)
        assert all(torch.isfinite(g).all() for g in got)
    s = get_runtime(model).stats()
    assert s["fallback"] is None and s["trajectories"] == 3 and s["cached_steps"] > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["recompiles"]


def test_lite_takes_the_probe():
    """lite with the probe computes the first block as a chain of its own
    (tests/test_verified_refresh.py); asked for explicitly, lite stays on."""
    from specdiff_fx import SpecDiffConfig

    cfg = SpecDiffConfig(policy="taylor", lite=True, tolerance=0.1)
    assert cfg.lite and cfg.probe


def test_interval_zero_means_warmup_and_reset_steps_only():
    case = build_tiny("dit")
    model, _ = compile_with(case.model, policy="taylor", compiler="eager", lite=True, warmup_steps=2,
                            interval=0, reset_steps=(5, 8))
    run_steps(case, model, TIMESTEPS_10)
    plan = [e["calls"][0] for e in get_runtime(model).stats()["plan"]]
    assert [i for i, kind in enumerate(plan) if kind == "full"] == [0, 1, 5, 8]
