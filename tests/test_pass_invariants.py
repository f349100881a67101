"""The invariants every rewrite keeps (specdiff_fx/passes/README.md), over every tiny family and
every policy's variants as the backend builds them: dynamo's graph untouched (1), buffers after
the graph's own inputs (2), the original's outputs (4), every tag declared (6)."""

import pytest
import torch

from specdiff_fx import make_backend
from specdiff_fx.passes.tags import CACHING_LEVELS
from specdiff_fx.passes.verify import output_signature
from specdiff_fx.testing.tiny_models import build_tiny

POLICIES = {
    "fora": dict(policy="fora"),
    "taylor-lite-probe": dict(policy="taylor", lite=True, probe=True, taylor_order=2),
    "taylor-branch": dict(policy="taylor", lite=False),
    "specdiff": dict(policy="specdiff"),
    "specdiff-forecast": dict(policy="specdiff", c3="forecast", partial_every=2),
}


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux", "unet"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_variant_keeps_the_pass_invariants(family, policy, capture):
    if policy.startswith("specdiff") and family == "unet":  # conv maps: no token axis
        pytest.skip("a UNet's features are conv maps, not a token sequence (a documented fallback)")
    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs())
    code, placeholders = gm.code, [n.name for n in gm.graph.find_nodes(op="placeholder")]
    runtime = make_backend(compiler="eager", **POLICIES[policy]).build_runtime(gm, example)
    assert gm.code == code, "the input graph was mutated"
    want = output_signature(gm)
    variants = {name: g for name, g in runtime.graphs.items() if name != "original"}
    assert variants and set(variants) == set(runtime.variants)
    for name, graph in variants.items():
        own = [n.name for n in graph.graph.find_nodes(op="placeholder")]
        assert own[:len(placeholders)] == placeholders, name  # buffers come after the graph's inputs
        extra = own[len(placeholders):]
        assert extra == [s.name for s in runtime.buffer_specs_for(name)], name
        assert output_signature(graph) == want, name
        for node in graph.graph.nodes:
            if "specdiff" in node.meta:
                assert node.meta["specdiff"] in CACHING_LEVELS, (name, node.name, node.meta["specdiff"])
    # each variant runs on real tensors and returns what the original returns, in shape and dtype
    buffers = {name: [torch.zeros(s.shape, dtype=s.dtype) if s.role.name != "INDEX"
                      else torch.arange(s.shape[-1]).expand(s.shape).contiguous()
                      for s in runtime.buffer_specs_for(name)] for name in variants}
    with torch.no_grad():
        ref = gm(*example)
        for name, graph in variants.items():
            out = graph(*example, *buffers[name])
            flat_ref, flat_out = torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(out)
            assert [(t.shape, t.dtype) for t in flat_out] == [(t.shape, t.dtype) for t in flat_ref], name
