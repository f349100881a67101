"""The same contracts under real Inductor compilation (slow cold; fast with a warm TORCHINDUCTOR_CACHE_DIR)."""

import pytest
import torch

from specdiff_fx import get_runtime
from specdiff_fx.tiny_models import build_tiny

from helpers import TIMESTEPS_10, assert_all_close, compile_with, run_steps

pytestmark = [pytest.mark.inductor, pytest.mark.slow]


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_policy_off_matches_plain_inductor(family):
    case = build_tiny(family)
    ts = TIMESTEPS_10[:3]
    plain = torch.compile(case.model, fullgraph=True, dynamic=False)
    expected = run_steps(case, plain, ts)
    torch._dynamo.reset()
    ours, _ = compile_with(case.model, policy="off", compiler="inductor")
    assert_all_close(run_steps(case, ours, ts), expected)
    assert get_runtime(ours).stats()["fallback"] is None


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_fora_under_inductor_matches_eager_rewrite(family):
    from torch._dynamo.utils import counters

    case = build_tiny(family)
    cfg = dict(policy="fora", warmup_steps=1, interval=2)
    eager, _ = compile_with(case.model, compiler="eager", **cfg)
    expected = run_steps(case, eager, TIMESTEPS_10)
    torch._dynamo.reset()
    counters.clear()
    compiled, backend = compile_with(case.model, compiler="inductor", **cfg)
    for seed in (0, 1):  # a second trajectory: no recompiles, same result
        got = run_steps(case, compiled, TIMESTEPS_10)
        assert_all_close(got, expected)
    s = get_runtime(compiled).stats()
    assert s["cached_steps"] == 8 and s["trajectories"] == 2 and s["fallback"] is None
    assert counters["stats"]["unique_graphs"] == 1
    assert len(backend._runtimes) == 1
