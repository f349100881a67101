"""Verified forecasts in lite mode: the lite probe, refreshes it schedules, a growing threshold.

With ``lite=True`` and the probe, the first block is a forecast target of its own (a chain
per stream it writes); the forecast step computes it, compares its residual with its
forecast and forecasts the rest of the stack from its real output.  The error estimate is
checked against an independent computation with forward hooks on the first block.
"""

import math

import pytest
import torch

from specdiff_fx import SpecDiffConfig, get_runtime
from specdiff_fx.passes.forecast_variants import (
    FORECAST_PROBE_TAG,
    ResidualChain,
    build_forecast_record_variant,
    build_forecast_variant,
    lite_targets,
    probe_targets,
)
from specdiff_fx.passes.graph_queries import is_attention, is_heavy
from specdiff_fx.passes.module_paths import block_of, group_nodes_by_block, module_path_of
from specdiff_fx.passes.residual_branches import find_residual_branches
from specdiff_fx.testing.tiny_models import build_tiny

from helpers import TIMESTEPS_10, assert_all_close, compile_with, run_steps, stack_forecast_reference

# blocks the first block's chains cover, per stream, on the tiny models
FIRST_BLOCK_STREAMS = {"dit": {"image"}, "sd3": {"image", "context"}, "flux": {"image", "context"}}


def _run(gm, args):
    with torch.no_grad():
        out = gm(*args)
    return out[0] if isinstance(out, (tuple, list)) else out


def _lite_probe(gm):
    branches = find_residual_branches(gm)
    targets = lite_targets(gm, branches, probe_first_block=True)
    return branches, targets, probe_targets(targets, branches[0].block)


def _original_nodes_by_block(gm) -> dict[str, set[str]]:
    """Names of the nodes dynamo traced (not inserted by a rewrite), per block."""
    return {block: {n.name for n in nodes if "specdiff" not in n.meta}
            for block, nodes in group_nodes_by_block(gm).items()}


# ----------------------------------------------------------------------------- pass level
@pytest.mark.parametrize("family", sorted(FIRST_BLOCK_STREAMS))
def test_lite_probe_keeps_exactly_the_first_block(family, capture):
    """The first block forms a chain per stream it writes; the forecast variant keeps every op
    of that block and no heavy op of any other block; the record variant records it too."""
    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs())
    branches, targets, probed = _lite_probe(gm)
    first = branches[0].block
    chains = [t for t in targets if t.name in probed]
    assert chains and all(isinstance(t, ResidualChain) and t.blocks == (first,) for t in chains)
    assert {t.stream for t in chains} == FIRST_BLOCK_STREAMS[family]
    assert sorted(b for t in chains for b in t.branches) == sorted(b.name for b in branches if b.block == first)
    assert all(first not in t.blocks for t in targets if t.name not in probed), "cut after the first block"

    forecast, specs = build_forecast_variant(gm, targets, probe_branches=probed)
    kept = _original_nodes_by_block(forecast)
    original = _original_nodes_by_block(gm)
    assert kept[first] == original[first], "every op of the first block is computed"
    heavy_outside = [n.name for n in forecast.graph.nodes
                     if is_heavy(n) and block_of(module_path_of(n)) != first and "specdiff" not in n.meta
                     and any(part.isdigit() for part in block_of(module_path_of(n)).split("."))]
    assert not heavy_outside, heavy_outside
    assert sum(is_attention(n) for n in forecast.graph.nodes) == 1  # the first block's (joint) attention
    if family in ("dit", "sd3"):  # every later block drops out entirely
        assert all(not kept.get(block) for block in original if block.startswith("transformer_blocks.")
                   and block != first)
    plain_lite, _ = build_forecast_variant(gm, lite_targets(gm, branches))
    assert not any(is_attention(n) for n in plain_lite.graph.nodes)
    assert any(n.meta.get("specdiff") == FORECAST_PROBE_TAG for n in forecast.graph.nodes)
    # the record variant records every target, the probed chains included
    record, record_specs = build_forecast_record_variant(gm, targets)
    assert {s.branch for s in record_specs if s.branch} == {t.name for t in targets}
    # at the recorded inputs, with no difference yet, the forecast is exact and so is the estimate
    bufs = [torch.zeros(s.shape, dtype=s.dtype) for s in specs]
    reference = _run(gm, example)
    assert torch.equal(_run(record, example + bufs), reference)
    bufs[-2].copy_(torch.tensor([0.0, 0.0, 2.0, 2.0]))
    bufs[-1].fill_(float("nan"))
    torch.testing.assert_close(_run(forecast, example + bufs), reference, atol=1e-5, rtol=1e-5)
    assert float(bufs[-1]) == pytest.approx(0.0, abs=1e-6)


def test_lite_probe_costs_one_block(capture):
    """FLOPs (count_flops, as the backend counts them): on DiT's two identical blocks the lite
    probe adds exactly one block to the forecast step, half of what the blocks cost at a full
    step (examples/probe_cost.py measures the share on larger models)."""
    from specdiff_fx.policies.flops import count_flops

    case = build_tiny("dit")
    gm, example = capture(case.model, case.make_inputs())
    branches, targets, probed = _lite_probe(gm)

    def flops(targets, probe=()):
        graph, specs = build_forecast_variant(gm, targets, probe_branches=probe)
        return count_flops(graph, example + [torch.zeros(s.shape, dtype=s.dtype) for s in specs])

    full = count_flops(gm, example)
    lite = flops(lite_targets(gm, branches))
    probe = flops(targets, probed) - lite
    assert 0 < lite < probe and 2 * probe == full - lite
    # the runtime states the same share (the bench prints it beside a verified row)
    model, _ = compile_with(case.model, policy="taylor", compiler="eager", lite=True, probe=True)
    run_steps(case, model, TIMESTEPS_10[:3])
    assert get_runtime(model).stats()["probe_flops_share"] == pytest.approx(probe / full)
    plain, _ = compile_with(case.model, policy="taylor", compiler="eager", lite=True)
    run_steps(case, plain, TIMESTEPS_10[:3])
    assert "probe_flops_share" not in get_runtime(plain).stats()


def test_probe_targets_per_branch_are_the_first_blocks_branches(capture):
    """Without lite the probe is, as before, every branch of the first block."""
    case = build_tiny("sd3")
    gm, _ = capture(case.model, case.make_inputs())
    branches = find_residual_branches(gm)
    assert probe_targets(branches, branches[0].block) == tuple(
        b.name for b in branches if b.block == branches[0].block)


# ----------------------------------------------------------------------------- trajectory level
class FirstBlockResiduals:
    """Forward hooks on the first block: its residual ``output − input`` per stream, per call."""

    def __init__(self, block):
        self.calls: list[list[torch.Tensor]] = []
        self._inputs = None
        self.handles = [block.register_forward_pre_hook(self._pre, with_kwargs=True),
                        block.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        self._inputs = (hidden, context)

    def _post(self, module, args, kwargs, output):
        hidden, context = self._inputs
        if isinstance(output, tuple):  # joint blocks return (encoder_hidden_states, hidden_states)
            self.calls.append([output[1] - hidden, output[0] - context])
        else:
            self.calls.append([output - hidden])

    def remove(self):
        for h in self.handles:
            h.remove()


def _first_block_module(family, model):
    return model.transformer_blocks[0]


@pytest.mark.parametrize("family", sorted(FIRST_BLOCK_STREAMS))
def test_lite_probe_error_equals_the_first_blocks_forecast_error(family):
    """Full steps at 0 and 1, forecasts after: the estimate read at the next call equals
    Σ|r − (r₁ + k·(r₁ − r₀))| / Σ|r| over the first block's true residuals r (every stream),
    computed from hooks on the plain model."""
    case = build_tiny(family)
    model, _ = compile_with(case.model, policy="taylor", compiler="eager", lite=True, probe=True,
                            warmup_steps=2, interval=0)
    steps = TIMESTEPS_10[:5]
    run_steps(case, model, steps)
    stats = get_runtime(model).stats()
    assert [e["calls"][0] for e in stats["plan"]] == ["full", "full", "forecast", "forecast", "forecast"]
    assert stats["error_refreshes"] == 0 and stats["tolerance"] is None
    got = stats["forecast_errors"]
    assert len(got) == 2  # the estimates of steps 2 and 3, read at steps 3 and 4

    hooks = FirstBlockResiduals(_first_block_module(family, case.model))
    try:
        run_steps(case, case.model, steps)
    finally:
        hooks.remove()
    r0, r1 = hooks.calls[0], hooks.calls[1]
    want = []
    for step in (2, 3):
        k = float(step - 1)
        true = hooks.calls[step]
        num = sum(float((g - (b + k * (b - a))).abs().sum()) for g, a, b in zip(true, r0, r1))
        den = sum(float(g.abs().sum()) for g in true)
        want.append(num / den)
    assert want[0] > 1e-3, "the estimate is not trivially 0"
    assert got == pytest.approx(want, rel=1e-4)


def test_lite_probe_forecast_composes_from_the_computed_first_block():
    """DiT: at a forecast step the first block is computed and the rest of the stack is
    ``x₁ + F + k·D1`` on the residual of blocks 1.., x₁ the first block's real output."""
    case = build_tiny("dit")
    model, _ = compile_with(case.model, policy="taylor", compiler="eager", lite=True, probe=True,
                            warmup_steps=2, interval=3)
    got = run_steps(case, model, TIMESTEPS_10)
    plan = [e["calls"][0] for e in get_runtime(model).stats()["plan"]]
    assert plan.count("forecast") == 5
    want = stack_forecast_reference(case, plan, TIMESTEPS_10, first=1)
    assert_all_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_exceeded_tolerance_refreshes_and_an_infinite_one_changes_nothing(family):
    """A tolerance every estimate exceeds makes each step after a forecast full; an infinite
    one leaves the schedule (and the outputs) as the probe alone gives them."""
    config = dict(policy="taylor", compiler="eager", lite=True, warmup_steps=2, interval=4)
    case = build_tiny(family)
    probed, _ = compile_with(case.model, probe=True, **config)
    probed_out = run_steps(case, probed, TIMESTEPS_10)
    probed_stats = get_runtime(probed).stats()
    fixed, _ = compile_with(build_tiny(family).model, **config)
    run_steps(case, fixed, TIMESTEPS_10)
    fixed_plan = [e["calls"] for e in get_runtime(fixed).stats()["plan"]]
    assert [e["calls"] for e in probed_stats["plan"]] == fixed_plan
    assert min(probed_stats["forecast_errors"]) > 1e-4

    loose, _ = compile_with(build_tiny(family).model, tolerance=math.inf, **config)
    loose_out = run_steps(case, loose, TIMESTEPS_10)
    loose_stats = get_runtime(loose).stats()
    assert [e["calls"] for e in loose_stats["plan"]] == fixed_plan and loose_stats["error_refreshes"] == 0
    assert loose_stats["forecast_errors"] == probed_stats["forecast_errors"]
    assert_all_close(loose_out, probed_out, atol=0, rtol=0)

    tight, _ = compile_with(build_tiny(family).model, tolerance=1e-6, **config)
    run_steps(case, tight, TIMESTEPS_10)
    tight_stats = get_runtime(tight).stats()
    plan = [e["calls"][0] for e in tight_stats["plan"]]
    assert tight_stats["error_refreshes"] > 0
    # every forecast step is followed by a full one: the schedule alternates after the warm-up
    assert all(b == "full" for a, b in zip(plan, plan[1:]) if a == "forecast")
    assert plan.count("full") > [c[0] for c in fixed_plan].count("full")
    refreshed = [e for e in tight_stats["plan"] if e.get("details") and e["details"][0].get("refresh")]
    assert all(e["details"][0]["error"] > e["details"][0]["threshold"] == 1e-6 for e in refreshed)


def test_tolerance_growth_raises_the_threshold_with_the_step():
    """threshold(s) = tolerance · (1 + growth · s): a tolerance the late estimates exceed
    refreshes without growth; with enough growth the same tolerance leaves the schedule as is."""
    config = dict(policy="taylor", compiler="eager", lite=True, warmup_steps=2, interval=0)
    case = build_tiny("dit")
    probed, _ = compile_with(case.model, probe=True, **config)
    run_steps(case, probed, TIMESTEPS_10)
    errors = get_runtime(probed).stats()["forecast_errors"]  # read at steps 3..9
    assert len(errors) == 7
    tolerance = 0.5 * min(errors)

    flat, _ = compile_with(build_tiny("dit").model, tolerance=tolerance, **config)
    run_steps(case, flat, TIMESTEPS_10)
    assert get_runtime(flat).stats()["error_refreshes"] > 0

    growth = 1.1 * max((e / tolerance - 1.0) / step for step, e in zip(range(3, 10), errors))
    grown, _ = compile_with(build_tiny("dit").model, tolerance=tolerance, tolerance_growth=growth, **config)
    run_steps(case, grown, TIMESTEPS_10)
    runtime = get_runtime(grown)
    stats = runtime.stats()
    assert stats["error_refreshes"] == 0 and stats["tolerance_growth"] == growth
    assert stats["forecast_errors"] == errors
    thresholds = [(i, e["details"][0]["threshold"]) for i, e in enumerate(stats["plan"])
                  if e.get("details") and "threshold" in e["details"][0]]
    assert [i for i, _ in thresholds] == list(range(3, 10))
    for step, threshold in thresholds:
        assert threshold == pytest.approx(tolerance * (1.0 + growth * step))
        assert threshold == pytest.approx(runtime.threshold(step))
    assert [t for _, t in thresholds] == sorted(t for _, t in thresholds)
    assert runtime.threshold(0) == tolerance


def test_config_lite_probe_and_tolerance_growth():
    cfg = SpecDiffConfig(policy="taylor", lite=True, tolerance=0.1, tolerance_growth=0.05)
    assert cfg.lite and cfg.probe and cfg.tolerance_growth == 0.05
    assert SpecDiffConfig(policy="taylor", lite=True, probe=True).lite
    assert SpecDiffConfig().tolerance_growth == 0.0
    for bad in (-0.1, math.inf, math.nan, True, "0.1"):
        with pytest.raises(ValueError, match="tolerance_growth"):
            SpecDiffConfig(policy="taylor", tolerance=0.1, tolerance_growth=bad)
    with pytest.raises(ValueError, match="tolerance_growth"):
        SpecDiffConfig(policy="taylor", tolerance_growth=0.1)  # nothing to grow


def test_lite_probe_through_a_pipeline():
    """compile_pipeline with lite and a tolerance: the probe runs, refreshes follow the estimate."""
    from specdiff_fx import compile_pipeline
    from tiny_pipelines import build_pipeline

    case = build_pipeline("sd3")
    plain = case(0)
    compile_pipeline(case.pipe, policy="taylor", compiler="eager", dynamic=False, lite=True, tolerance=1e-6,
                     warmup_steps=2, interval=4)
    out = case(0)
    stats = get_runtime(case.pipe.transformer).stats()
    plan = [e["calls"][0] for e in stats["plan"]]
    assert stats["fallback"] is None and stats["probe"]
    # 5 steps: warm-up 0-1, the interval's full step 2, a forecast at 3, step 4 refreshed
    assert plan == ["full", "full", "full", "forecast", "full"], plan
    assert stats["error_refreshes"] == 1
    assert all(math.isfinite(e) and e > 1e-6 for e in stats["forecast_errors"])
    assert torch.isfinite(out).all() and out.shape == plain.shape
