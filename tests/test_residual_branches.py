import pytest
import torch

from specdiff_fx.passes.residual_branches import count_kinds, find_residual_branches
from specdiff_fx.testing.tiny_models import build_tiny

from helpers import PlainMLP

EXPECTED = {
    # DiT: adaLN-Zero blocks, gated self-attention + gated MLP per block.
    "dit": {"self_attention": 2, "feed_forward": 2},
    # PixArt: gated self-attention, ungated cross-attention, gated MLP per block.
    "pixart": {"self_attention": 2, "cross_attention": 2, "feed_forward": 2},
    # SD3: dual stream; the last block is context_pre_only (no context residuals).
    "sd3": {"self_attention": 2, "feed_forward": 2, "context_self_attention": 1, "context_feed_forward": 1},
    # FLUX: one dual-stream block, two single-stream (parallel attention+MLP) blocks; text and image
    # are concatenated once before them, so the second reads the first one's joint add: joint too.
    "flux": {"self_attention": 1, "feed_forward": 1, "context_self_attention": 1,
             "context_feed_forward": 1, "joint_parallel": 2},
    # UNet: 8 ResnetBlock2D + 4 Transformer2DModel (outermost residual kept).
    "unet": {"resnet": 8, "transformer": 4},
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_branch_counts_and_kinds(family, capture):
    case = build_tiny(family)
    gm, _ = capture(case.model, case.make_inputs())
    branches = find_residual_branches(gm)
    assert count_kinds(branches) == EXPECTED[family]
    names = {n.name for n in gm.graph.nodes}
    for br in branches:
        assert {br.add, br.source, br.output, br.cached} <= names
        assert br.output in br.body and br.add not in br.body and br.source not in br.body
        assert br.owner and br.block and br.modules


def test_gates_are_found_and_cached_before_gating(capture):
    case = build_tiny("dit")
    gm, _ = capture(case.model, case.make_inputs())
    nodes = {n.name: n for n in gm.graph.nodes}
    for br in find_residual_branches(gm):
        assert br.gate is not None
        out = nodes[br.output]
        assert set(out.all_input_nodes) == {nodes[br.gate], nodes[br.cached]}
        # the gate comes from the timestep embedding, not from the residual stream
        assert br.gate not in br.body


def test_attention_sites_and_modules(capture):
    case = build_tiny("sd3")
    gm, _ = capture(case.model, case.make_inputs())
    branches = {b.name: b for b in find_residual_branches(gm)}
    attn = branches["transformer_blocks.0:self_attention"]
    ctx = branches["transformer_blocks.0:context_self_attention"]
    assert len(attn.attention_nodes) == 1
    assert attn.attention_nodes == ctx.attention_nodes  # joint attention is shared
    assert any(m.endswith("attn.to_q") for m in attn.modules)
    assert any(m.endswith("norm1_context") for m in ctx.modules)
    ff = branches["transformer_blocks.0:feed_forward"]
    assert not ff.attention_nodes and any(m.endswith("ff.net.2") for m in ff.modules)


def test_unet_nested_residuals_resolve_to_outermost(capture):
    case = build_tiny("unet")
    gm, _ = capture(case.model, case.make_inputs())
    branches = find_residual_branches(gm)
    transformers = [b for b in branches if b.kind == "transformer"]
    # each Transformer2DModel holds self- and cross-attention of its inner block
    assert all(len(b.attention_nodes) == 2 for b in transformers)
    assert all(".attentions." in b.owner and "transformer_blocks" not in b.owner for b in transformers)
    # inner BasicTransformerBlock adds are part of the outer body, not branches of their own
    assert not any("transformer_blocks" in b.owner for b in branches)


class Elementwise(torch.nn.Module):
    """x + sin(x): same shapes, but no heavy op, so not a branch worth caching."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Identity()

    def forward(self, x):
        return self.inner(x) + torch.sin(self.inner(x))


@pytest.mark.parametrize("model,kwargs", [
    (PlainMLP(), dict(x=torch.randn(2, 8), timestep=torch.ones(2, 1))),
    (Elementwise(), dict(x=torch.randn(2, 8))),
])
def test_no_false_branches(model, kwargs, capture):
    gm, _ = capture(model, kwargs)
    assert find_residual_branches(gm) == []


def test_analysis_does_not_mutate_graph(capture):
    case = build_tiny("flux")
    gm, _ = capture(case.model, case.make_inputs())
    before = gm.code
    find_residual_branches(gm)
    assert gm.code == before
