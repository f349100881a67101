"""``SpecDiffConfig.cache_dtype``: fora's branch caches and taylor's Taylor terms held in bf16/fp16.

Contracts: the buffers are allocated in the narrow dtype (half the cache memory of an fp32
model); full steps are unchanged (the caches only store); cached steps read the stored values
back through a cast, so they differ from the full-precision caches by rounding alone."""

import pytest
import torch

from specdiff_fx import SpecDiffConfig, get_runtime
from specdiff_fx.testing.tiny_models import build_tiny

from helpers import TIMESTEPS_10, compile_with, run_steps

CONFIGS = {
    "fora": dict(policy="fora", warmup_steps=2, interval=3),
    "taylor": dict(policy="taylor", lite=False, warmup_steps=2, interval=3),
    "taylor-lite": dict(policy="taylor", lite=True, warmup_steps=2, interval=3),
    "taylor order 2": dict(policy="taylor", lite=False, taylor_order=2, warmup_steps=3, interval=3),
}


def _run(case, **config):
    torch._dynamo.reset()
    model, _ = compile_with(case.model, compiler="eager", **config)
    outs = run_steps(case, model, TIMESTEPS_10)
    return outs, get_runtime(model)


@pytest.mark.parametrize("family", ["dit", "sd3"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_narrow_caches_round_only_what_they_store(family, name):
    case = build_tiny(family)
    wide, wide_rt = _run(case, **CONFIGS[name])
    narrow, narrow_rt = _run(case, **CONFIGS[name], cache_dtype="bfloat16")
    held = [s for s in narrow_rt.buffer_specs_for("full") if s.role in ("branch_cache", "taylor_term")]
    assert held and all(s.dtype == torch.bfloat16 for s in held)
    assert narrow_rt.slot(0).nbytes < 0.6 * wide_rt.slot(0).nbytes
    plan = [e["calls"][0] for e in narrow_rt.stats()["plan"]]
    assert plan == [e["calls"][0] for e in wide_rt.stats()["plan"]]
    for i, (n, w) in enumerate(zip(narrow, wide)):
        assert n.dtype == w.dtype
        if plan[i] == "full" and (i == 0 or plan[i - 1] == "full"):
            torch.testing.assert_close(n, w, rtol=1e-5, atol=1e-5)  # nothing read from a cache yet
        else:
            rel = ((n - w).norm() / w.norm()).item()
            assert rel < 2e-2, (i, plan[i], rel)                     # bf16 rounding of the stored values
    assert any(not torch.equal(n, w) for n, w in zip(narrow, wide))  # the option is in effect


def test_cache_dtype_is_validated():
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        SpecDiffConfig(cache_dtype="int8")
    with pytest.raises(ValueError, match="cache_dtype belongs to policy .fora. and .taylor."):
        SpecDiffConfig(policy="specdiff", cache_dtype="bfloat16")
    assert SpecDiffConfig(policy="fora", cache_dtype="float16").cache_dtype == "float16"
