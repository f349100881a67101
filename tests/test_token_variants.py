"""Partial exactness (docs/design.md §3): full at X, then partial at the same X with any C1
subsets: the C1 tokens' features equal the full features at those tokens."""

import pytest
import torch

from specdiff_fx import SpecDiffConfig
from specdiff_fx.passes.graph_queries import is_attention, tensor_meta
from specdiff_fx.passes.token_axis import analyze_token_axis
from specdiff_fx.passes import token_ops
from specdiff_fx.passes.token_variants import (
    ImportanceSampling,
    build_token_draft_variant,
    build_token_partial_variant,
    build_token_record_variant,
)
from specdiff_fx.testing.tiny_models import build_tiny

FAMILIES = ["dit", "pixart", "sd3", "flux"]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def record_at(gm, region, example):
    record, specs = build_token_record_variant(gm, region)
    bufs = {s.name: torch.full(s.shape, float("nan"), dtype=s.dtype) for s in specs}
    with torch.no_grad():
        out = _first(record(*example, *[bufs[s.name] for s in specs]))
    return out, bufs, specs


def partial_buffers(specs, recorded, index, history, reuse_mask=None, weights=(1.0, 0.0, 0.0)):
    bufs = []
    for s in specs:
        if s.role == "index":
            bufs.append(index)
        elif s.role == "reuse_mask":
            bufs.append(torch.zeros(s.shape, dtype=torch.bool) if reuse_mask is None else reuse_mask)
        elif s.role == "mix_weights":
            bufs.append(torch.tensor(weights))
        elif s.role == "history":
            bufs.append(history[s.ring].clone())
        else:
            bufs.append(recorded[s.name].clone())
    return bufs


def random_subsets(batch, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(batch)])


def assert_partial_exact(gm, region, example, recorded, k, seed):
    """A partial step over random subsets (one per batch row), fed the K/V recorded by a full
    step at the same inputs and garbage history: the computed tokens equal the full step's, the
    others come from the history (they really were not recomputed).  Returns the subsets."""
    full_features = recorded["specdiff_history_out"]
    partial, specs = build_token_partial_variant(gm, region, k)
    index = random_subsets(2, region.num_tokens, k, seed=seed)
    garbage = [torch.randn_like(full_features) * 100 for _ in range(3)]
    bufs = partial_buffers(specs, recorded, index, garbage)
    with torch.no_grad():
        partial(*example, *bufs)
    written = bufs[[s.name for s in specs].index("specdiff_history_2")]
    rows = torch.arange(2).unsqueeze(1)
    torch.testing.assert_close(written[rows, index], full_features[rows, index], rtol=1e-5, atol=1e-5)
    others = torch.ones(2, region.num_tokens, dtype=torch.bool)
    others[rows, index] = False
    torch.testing.assert_close(written[others], garbage[0][others])
    return index


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [2, 5, 11, 16])
def test_partial_exactness(family, k, capture):
    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    full_out, recorded, _ = record_at(gm, region, example)
    torch.testing.assert_close(full_out, _first(gm(*example)), rtol=0, atol=0)
    for name, buf in recorded.items():
        assert torch.isfinite(buf).all(), f"{name} was not written by the full step"
    index = assert_partial_exact(gm, region, example, recorded, k, seed=k)
    assert not torch.equal(index[0], index[1]) or k == region.num_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_ratio_zero_matches_full_output(family, capture):
    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    full_out, recorded, _ = record_at(gm, region, example)
    partial, specs = build_token_partial_variant(gm, region, region.num_tokens)
    index = torch.arange(region.num_tokens).expand(2, -1).contiguous()
    bufs = partial_buffers(specs, recorded, index, [torch.zeros_like(recorded["specdiff_history_out"])] * 3)
    with torch.no_grad():
        out = _first(partial(*example, *bufs))
    torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-5)


def test_c2_and_c3_composition(capture):
    case = build_tiny("sd3")
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    _, recorded, _ = record_at(gm, region, example)
    partial, specs = build_token_partial_variant(gm, region, 4)
    index = random_subsets(2, region.num_tokens, 4, seed=0)
    hist = [torch.full_like(recorded["specdiff_history_out"], v) for v in (1.0, 2.0, 4.0)]
    reuse = torch.zeros(2, region.num_tokens, dtype=torch.bool)
    reuse[:, :3] = True
    reuse[torch.arange(2).unsqueeze(1), index] = False
    bufs = partial_buffers(specs, recorded, index, hist, reuse_mask=reuse, weights=(0.5, 0.25, 0.25))
    with torch.no_grad():
        partial(*example, *bufs)
    written = bufs[[s.name for s in specs].index("specdiff_history_2")]
    c1 = torch.zeros_like(reuse)
    c1[torch.arange(2).unsqueeze(1), index] = True
    assert torch.all(written[reuse] == 1.0)                       # C2: last value
    assert torch.allclose(written[~reuse & ~c1], torch.tensor(2.0))  # C3: 0.5*1 + 0.25*2 + 0.25*4


def test_importance_is_attention_received(capture):
    case = build_tiny("dit")
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    _, recorded, _ = record_at(gm, region, example)
    imp = recorded["specdiff_importance"]
    # every query's attention sums to 1: total received = layers * heads * queries
    sites = sum(s.key_layout is not None for s in region.sites)
    torch.testing.assert_close(imp.sum(dim=1), torch.full((2,), float(sites * 2 * 16)))
    draft, specs = build_token_draft_variant(gm, region)
    assert [s.role for s in specs] == ["importance"]
    buf = torch.zeros(specs[0].shape)
    with torch.no_grad():
        draft(*example, buf)
    torch.testing.assert_close(buf, imp)


def test_partial_graph_is_smaller_and_keeps_the_original(capture):
    case = build_tiny("flux")
    gm, _ = capture(case.model, case.make_inputs(batch=2))
    before = gm.code
    region = analyze_token_axis(gm)
    partial, _ = build_token_partial_variant(gm, region, 4)
    assert gm.code == before
    kinds = {n.meta.get("specdiff") for n in partial.graph.nodes}
    assert {"token_gather", "kv_completion", "token_compose", "token_count", "cache_write"} <= kinds
    assert sum(is_attention(n) for n in partial.graph.nodes) == sum(is_attention(n) for n in gm.graph.nodes)


def test_importance_sums_over_many_layers(capture):
    """Regression: with more than two attention sites the summed scores stay in graph order."""
    case = build_tiny("sd3", layers=4)
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    _, recorded, _ = record_at(gm, region, example)
    sites = sum(s.key_layout is not None for s in region.sites)
    assert sites == 4
    # each query's attention sums to 1 over image + text keys; image keys get most of it
    assert torch.all(recorded["specdiff_importance"].sum(dim=1) <= sites * 2 * (16 + 5) + 1e-3)
    assert torch.all(recorded["specdiff_importance"] > 0)


def _ranks(x):
    return x.argsort(dim=-1).argsort(dim=-1).float()


def spearman(a, b):
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


@pytest.mark.parametrize("stride", [2, 4])
def test_query_subsampled_importance_ranks_like_exact(stride, capture):
    """The estimator's rank correlation with exact attention received stays above a floor."""
    case = build_tiny("sd3", layers=3, sample=16, patch=2)  # 64 image tokens
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    _, exact_bufs, _ = record_at(gm, region, example)
    estimate, specs = build_token_record_variant(gm, region, ImportanceSampling(stride))
    bufs = {s.name: torch.zeros(s.shape, dtype=s.dtype) for s in specs}
    with torch.no_grad():
        estimate(*example, *[bufs[s.name] for s in specs])
    rho = spearman(bufs["specdiff_importance"], exact_bufs["specdiff_importance"])
    print(f"stride {stride}: Spearman rho per batch element {rho.tolist()}")
    assert torch.all(rho > 0.8), rho
    assert not torch.allclose(bufs["specdiff_importance"], exact_bufs["specdiff_importance"])


def test_importance_sampling_stride_and_sites():
    s = ImportanceSampling(stride=4, max_queries=256)
    assert s.stride_for(1056) == 5          # ceil(1056/256) = 5, odd already
    assert s.stride_for(4429) == 18 and -(-4429 // 18) <= 256
    assert s.stride_for(800) == 4           # the minimum stride already samples <= 256
    assert ImportanceSampling(stride=1, max_queries=64).stride_for(256) == 4
    assert ImportanceSampling().stride_for(10_000) == 1
    assert ImportanceSampling(max_sites=6).sites(24) == [2, 6, 10, 14, 18, 22]
    assert ImportanceSampling(max_sites=2).sites(4) == [1, 3]
    assert ImportanceSampling(max_sites=1).sites(5) == [2]
    assert ImportanceSampling(max_sites=8).sites(3) == [0, 1, 2]
    # the config checks the values once; the pass trusts them (config.py)
    for bad in (dict(importance_query_stride=0), dict(importance_queries=0), dict(importance_sites=True),
                dict(importance_sites=1.5)):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            SpecDiffConfig(policy="specdiff", **bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_sampling_bounds_the_scored_sites_and_queries(family, capture):
    """max_sites scores only that many sites; max_queries bounds each site's query sample."""
    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    exact, _ = build_token_record_variant(gm, region)

    def calls(g):
        return [n for n in g.graph.nodes if n.target is token_ops.attention_received]

    sites = len(calls(exact))
    assert sites >= 2
    sampling = ImportanceSampling(stride=1, max_queries=8, max_sites=sites - 1)
    sampled, specs = build_token_record_variant(gm, region, sampling)
    assert len(calls(sampled)) == sites - 1
    bufs = [torch.zeros(s.shape, dtype=s.dtype) for s in specs]
    with torch.no_grad():
        sampled(*example, *bufs)
    importance = bufs[[s.name for s in specs].index("specdiff_importance")]
    assert torch.isfinite(importance).all() and importance.sum() > 0
    for node in calls(sampled):
        query = tensor_meta(node.args[0])
        stride = node.args[5]
        assert -(-query.shape[2] // stride) <= 8, (query.shape, stride)


@pytest.mark.parametrize("length,stride", [(256, 4), (257, 4), (1056, 17), (7, 3), (5, 1), (3, 8), (300_000, 4)])
def test_query_sample_takes_one_query_per_block(length, stride):
    """One position in each block of ``stride`` (the last block may be short), inside the sequence."""
    pos = token_ops.query_sample(length, stride)
    assert pos.shape == (-(-length // stride),)
    assert torch.equal(pos // stride, torch.arange(pos.numel()))
    assert int(pos.max()) < length and int(pos.min()) >= 0
    if stride > 2 and length >= 8 * stride:  # jittered, not a lattice
        assert len(set((pos % stride).tolist())) > 1


def test_backend_reports_and_applies_its_importance_plan(capture):
    """SpecDiffConfig's importance knobs reach the record and draft graphs and runtime.info."""
    from specdiff_fx import make_backend

    case = build_tiny("sd3", layers=3, sample=16, patch=2)  # 64 image tokens (+ text) per query row
    gm, example = capture(case.model, case.make_inputs(batch=2))
    runtime = make_backend(policy="specdiff", compiler="eager", importance_queries=8,
                           importance_sites=2).build_runtime(gm, example)
    plan = runtime.info["importance_sites"]
    assert len(plan) == 2 and all(row["query_stride"] >= 8 for row in plan), plan
    for name in ("full", "draft"):
        calls = [n for n in runtime.graphs[name].graph.nodes if n.target is token_ops.attention_received]
        assert [n.args[5] for n in calls] == [row["query_stride"] for row in plan]
