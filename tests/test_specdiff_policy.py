"""Policy "specdiff" end to end under the eager compiler."""

import pytest
import torch

from specdiff_fx import get_runtime
from specdiff_fx.testing.tiny_models import build_tiny

from helpers import TIMESTEPS_10, assert_all_close, compile_with, run_steps

CFG = dict(policy="specdiff", compiler="eager", cache_ratio=0.5, warmup_steps=2, reset_steps=(6,))


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_plan_and_stats(family):
    case = build_tiny(family)
    compiled, _ = compile_with(case.model, **CFG)
    outs = run_steps(case, compiled, TIMESTEPS_10)
    assert all(torch.isfinite(o).all() for o in outs)
    s = get_runtime(compiled).stats()
    kinds = [e["calls"][0] for e in s["plan"]]
    assert kinds == ["full", "full", "partial", "partial", "partial", "partial", "full",
                     "partial", "partial", "partial"]
    assert s["partial_steps"] == 7 and s["full_steps"] == 3 and s["draft_steps"] == 1
    assert s["subset_tokens"] == 8 and s["image_tokens"] == 16
    for e in s["plan"]:
        d = e["details"][0]
        assert d["c1"] + d["c2"] + d["c3"] == pytest.approx(16)
        if e["calls"][0] == "partial":
            assert d["refresh_ratio"] == 0.5 and 0 < d["est_flops_saved"] < 0.5
    assert s["flops"]["partial"] < s["flops"]["full"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cache_ratio_zero_matches_original(family):
    case = build_tiny(family)
    compiled, _ = compile_with(case.model, **dict(CFG, cache_ratio=0.0))
    assert_all_close(run_steps(case, compiled, TIMESTEPS_10[:5]), run_steps(case, case.model, TIMESTEPS_10[:5]))
    assert get_runtime(compiled).stats()["partial_steps"] == 3


def test_kv_cache_memory_matches_formula():
    case = build_tiny("sd3")  # 2 joint attention layers, width 16, 16 image + 5 text tokens
    compiled, _ = compile_with(case.model, **CFG)
    run_steps(case, compiled, TIMESTEPS_10[:3], batch=2)
    s = get_runtime(compiled).stats()
    layers, kv, batch, tokens, width, fp32 = 2, 2, 2, 16 + 5, 16, 4
    assert s["kv_cache_bytes"] == layers * kv * batch * tokens * width * fp32


def test_no_recompiles_over_three_trajectories_with_varying_subsets():
    from torch._dynamo.utils import counters

    case = build_tiny("sd3")
    compiled, backend = compile_with(case.model, **CFG)
    subsets = set()
    for seed in range(3):
        run_steps(case, compiled, TIMESTEPS_10, seed=seed)
        slot = get_runtime(compiled).slot(0)
        subsets.add(tuple(slot.find("index").flatten().tolist()))
    assert len(subsets) > 1, "different trajectories chose different C1 sets"
    assert counters["stats"]["unique_graphs"] == 1
    assert len(backend._runtimes) == 1
    assert get_runtime(compiled).stats()["trajectories"] == 3


def test_separate_cond_uncond_calls_match_running_alone():
    case = build_tiny("dit")
    ts = TIMESTEPS_10[:8]

    def alone(seed):
        torch._dynamo.reset()
        compiled, _ = compile_with(case.model, **CFG)
        return run_steps(case, compiled, ts, seed=seed, batch=1)

    a, b = alone(1), alone(2)
    torch._dynamo.reset()
    compiled, _ = compile_with(case.model, **CFG)
    got_a, got_b = [], []
    with torch.no_grad():
        for t in ts:
            got_a.append(case.output(compiled(**case.make_inputs(batch=1, timestep=t, seed=1))).clone())
            got_b.append(case.output(compiled(**case.make_inputs(batch=1, timestep=t, seed=2))).clone())
    assert_all_close(got_a, a)
    assert_all_close(got_b, b)
    assert get_runtime(compiled).stats()["cache_slots"] == 2


def test_draft_records_future_importance_and_can_be_disabled():
    case = build_tiny("sd3")
    compiled, _ = compile_with(case.model, **dict(CFG, draft_steps=3))
    run_steps(case, compiled, TIMESTEPS_10[:3])
    fut = get_runtime(compiled).slot(0).policy_state.fut
    assert [t for t, _ in fut] == pytest.approx([1000.0, 1000.0 * 2 / 3, 1000.0 / 3])
    assert not torch.equal(fut[0][1], fut[1][1])
    torch._dynamo.reset()
    compiled, _ = compile_with(case.model, **dict(CFG, draft_steps=0))
    run_steps(case, compiled, TIMESTEPS_10[:3])
    assert get_runtime(compiled).stats()["draft_steps"] == 0
    assert "draft" not in get_runtime(compiled).variants


def test_unet_falls_back_loudly():
    case = build_tiny("unet")
    compiled, _ = compile_with(case.model, **CFG)
    with pytest.warns(RuntimeWarning, match="token-level caching not possible"):
        out = run_steps(case, compiled, TIMESTEPS_10[:2])
    assert_all_close(out, run_steps(case, case.model, TIMESTEPS_10[:2]))
