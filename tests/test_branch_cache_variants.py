import pytest
import torch

from specdiff_fx.passes.branch_cache_variants import (
    build_branch_record_variant,
    build_branch_reuse_variant,
)
from specdiff_fx.passes.graph_queries import is_attention
from specdiff_fx.passes.residual_branches import find_residual_branches
from specdiff_fx.testing.tiny_models import build_tiny

FAMILIES = ["dit", "pixart", "sd3", "flux", "unet"]


def _run(gm, args):
    with torch.no_grad():
        out = gm(*args)
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("family", FAMILIES)
def test_record_then_reuse_at_same_inputs_is_exact(family, capture):
    """Caches recorded at X, fed back at X, reproduce the original output bitwise."""
    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs())
    before = gm.code
    branches = find_residual_branches(gm)
    record, specs = build_branch_record_variant(gm, branches)
    reuse, specs2 = build_branch_reuse_variant(gm, branches)
    assert specs == specs2 and len(specs) == len(branches)
    assert gm.code == before, "building variants must not touch dynamo's graph"

    caches = [torch.full(s.shape, float("nan"), dtype=s.dtype) for s in specs]
    reference = _run(gm, example)
    recorded = _run(record, example + caches)
    assert torch.equal(recorded, reference)
    assert all(torch.isfinite(c).all() for c in caches), "every cache is written by a full step"
    reused = _run(reuse, example + caches)
    assert torch.equal(reused, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_reuse_variant_drops_branch_bodies(family, capture):
    case = build_tiny(family)
    gm, _ = capture(case.model, case.make_inputs())
    branches = find_residual_branches(gm)
    reuse, _ = build_branch_reuse_variant(gm, branches)
    assert not any(is_attention(n) for n in reuse.graph.nodes)
    assert len(reuse.graph.nodes) < len(gm.graph.nodes)
    nodes = {n.name: n for n in reuse.graph.nodes}
    image = [b for b in branches if b.stream != "context"]
    for br in branches:
        consumer = nodes.get(br.add if br.cached == br.output else br.output)
        # a context-stream consumer may die too, when nothing downstream reads the text stream
        if consumer is None:
            assert br.stream == "context"
            continue
        assert consumer.meta.get("specdiff") == "branch_reuse"
        assert consumer.meta.get("nn_module_stack")  # keeps the module stack of its residual
        assert br.cached not in nodes
    assert all((b.add if b.cached == b.output else b.output) in nodes for b in image)


def test_reuse_reads_the_cache(capture):
    """Different cache contents give a different output: the reuse graph really reads them."""
    case = build_tiny("dit")
    gm, example = capture(case.model, case.make_inputs())
    branches = find_residual_branches(gm)
    reuse, specs = build_branch_reuse_variant(gm, branches)
    zeros = [torch.zeros(s.shape, dtype=s.dtype) for s in specs]
    ones = [torch.ones(s.shape, dtype=s.dtype) for s in specs]
    assert not torch.equal(_run(reuse, example + zeros), _run(reuse, example + ones))


def test_cache_inputs_are_static_and_named(capture):
    case = build_tiny("sd3")
    gm, _ = capture(case.model, case.make_inputs())
    branches = find_residual_branches(gm)
    record, specs = build_branch_record_variant(gm, branches)
    placeholders = list(record.graph.find_nodes(op="placeholder"))
    added = placeholders[-len(specs):]
    assert [p.name for p in added] == [s.name for s in specs]
    for p in added:
        assert p.meta["tensor_dict"]["_dynamo_static_input_type"] == "unguarded"
        assert p._dynamo_source is None
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), placeholders):
        assert old.name == new.name and old._dynamo_source == new._dynamo_source
