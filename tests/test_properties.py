"""Property tests over random tiny DiT / SD3 configurations (eager compiler)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdiff_fx import get_runtime
from specdiff_fx.testing.tiny_models import build_tiny

from helpers import HOOKED_MODULES, TIMESTEPS_10, assert_all_close, compile_with, hook_reference, run_steps

configs = st.fixed_dictionaries({
    "family": st.sampled_from(["dit", "sd3"]),
    "layers": st.integers(1, 3),
    "heads": st.integers(1, 3),
    "head_dim": st.sampled_from([4, 8]),
    "patch": st.sampled_from([1, 2]),
    "sample": st.sampled_from([4, 8]),
    "interval": st.integers(2, 3),
})

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _case(cfg):
    return build_tiny(cfg["family"], layers=cfg["layers"], heads=cfg["heads"], head_dim=cfg["head_dim"],
                      patch=cfg["patch"], sample=cfg["sample"])


@SETTINGS
@given(configs)
def test_off_policy_matches_original(cfg):
    torch._dynamo.reset()
    case = _case(cfg)
    compiled, _ = compile_with(case.model, policy="off", compiler="eager")
    ts = TIMESTEPS_10[:2]
    assert_all_close(run_steps(case, compiled, ts), run_steps(case, case.model, ts))


@SETTINGS
@given(configs)
def test_reuse_matches_hook_reference(cfg):
    torch._dynamo.reset()
    case = _case(cfg)
    compiled, _ = compile_with(case.model, policy="fora", warmup_steps=1, interval=cfg["interval"],
                               compiler="eager")
    ts = TIMESTEPS_10[:6]
    ours = run_steps(case, compiled, ts)
    plan = [e["calls"][0] for e in get_runtime(compiled).stats()["plan"]]
    assert "reuse" in plan
    assert_all_close(ours, hook_reference(case, HOOKED_MODULES[cfg["family"]], ts, plan))
