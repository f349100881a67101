"""The same contracts under real Inductor compilation (slow cold; fast with a warm TORCHINDUCTOR_CACHE_DIR)."""

import pytest
import torch

from specdiff_fx import get_runtime
from specdiff_fx.testing.tiny_models import build_tiny

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


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_specdiff_partial_exactness_under_inductor(family):
    """docs/design.md §3 partial exactness with both variants compiled by Inductor."""
    from torch._inductor.compile_fx import compile_fx

    from specdiff_fx.passes.token_axis import analyze_token_axis
    from specdiff_fx.passes.token_variants import build_token_partial_variant, build_token_record_variant

    from conftest import capture_graph

    case = build_tiny(family)
    gm, example = capture_graph(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    record, rspecs = build_token_record_variant(gm, region)
    k = 6
    partial, pspecs = build_token_partial_variant(gm, region, k)
    rbufs = {s.name: torch.zeros(s.shape, dtype=s.dtype) for s in rspecs}
    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(region.num_tokens, generator=g)[:k].sort().values for _ in range(2)])
    garbage = torch.randn_like(rbufs["specdiff_history_out"]) * 100

    def pbufs():
        out = []
        for s in pspecs:
            if s.role == "index":
                out.append(index.clone())
            elif s.role == "reuse_mask":
                out.append(torch.zeros(s.shape, dtype=torch.bool))
            elif s.role == "mix_weights":
                out.append(torch.tensor([1.0, 0.0, 0.0]))
            elif s.role == "history":
                out.append(garbage.clone())
            else:
                out.append(rbufs[s.name].clone())
        return out

    compiled_record = compile_fx(record, list(example) + [rbufs[s.name] for s in rspecs])
    compiled_partial = compile_fx(partial, list(example) + pbufs())
    with torch.no_grad():
        compiled_record(*example, *[rbufs[s.name] for s in rspecs])
        bufs = pbufs()
        compiled_partial(*example, *bufs)
    written = bufs[[s.name for s in pspecs].index("specdiff_history_2")]
    rows = torch.arange(2).unsqueeze(1)
    full = rbufs["specdiff_history_out"]
    torch.testing.assert_close(written[rows, index], full[rows, index], rtol=1e-5, atol=1e-5)


def test_specdiff_runtime_under_inductor_no_recompiles():
    from torch._dynamo.utils import counters

    case = build_tiny("sd3")
    compiled, backend = compile_with(case.model, policy="specdiff", compiler="inductor", cache_ratio=0.5,
                                     warmup_steps=2, reset_steps=(6,))
    for seed in range(3):
        outs = run_steps(case, compiled, TIMESTEPS_10, seed=seed)
        assert all(torch.isfinite(o).all() for o in outs)
    s = get_runtime(compiled).stats()
    assert s["fallback"] is None and s["trajectories"] == 3 and s["partial_steps"] == 21
    assert counters["stats"]["unique_graphs"] == 1
    assert len(backend._runtimes) == 1
