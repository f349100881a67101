import pytest
import sympy

from specdiff_fx.passes.token_axis import IMAGE, TEXT, N, TokenAxisError, analyze_token_axis
from specdiff_fx.testing.tiny_models import build_tiny

# (family, attention sites with image keys, sites total, joint text tokens in the layout)
EXPECTED = {
    "dit": (2, 2, None),
    "pixart": (2, 4, None),          # 2 self + 2 cross (keys are text: no K/V completion)
    "sd3": (2, 2, "after"),          # joint: [image, text]
    "flux": (3, 3, "before"),        # joint: [text, image]; 1 double + 2 single-stream blocks
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_regions_sites_and_layouts(family, capture):
    case = build_tiny(family)
    gm, _ = capture(case.model, case.make_inputs())
    region = analyze_token_axis(gm)
    image_sites, total, text = EXPECTED[family]
    assert len(region.sites) == total
    assert sum(s.key_layout is not None for s in region.sites) == image_sites
    assert region.num_tokens == 16
    assert region.axes[region.entry].segments == ((IMAGE, N),)
    assert region.axes[region.exit].segments == ((IMAGE, N),)
    layout = next(s for s in region.sites if s.key_layout is not None).key_layout
    kinds = [k for k, _ in layout.segments]
    assert kinds == {None: [IMAGE], "after": [IMAGE, TEXT], "before": [TEXT, IMAGE]}[text]


def test_sd3_joint_split_bounds_become_expressions_in_n(capture):
    case = build_tiny("sd3")
    gm, _ = capture(case.model, case.make_inputs())
    region = analyze_token_axis(gm)
    bounds = set()
    for args, _ in region.templates.values():
        for item in args[1]:
            if isinstance(item, slice):
                bounds |= {b for b in (item.start, item.stop) if isinstance(b, sympy.Basic)}
    assert bounds == {N}  # hidden[:, :N] and hidden[:, N:], not the constant 16


def test_flux_rope_tables_and_reshapes(capture):
    case = build_tiny("flux")
    gm, _ = capture(case.model, case.make_inputs())
    region = analyze_token_axis(gm)
    # RoPE cos/sin tables meet q and k of every block: 2 tables x 2 tensors x 3 blocks (the
    # second single-stream block reads the first one's joint output, not a concat)
    assert len(region.position_operands) == 12
    exprs = {x for args, _ in region.templates.values() for x in sympy.preorder_traversal(sympy.Tuple(*[
        a for a in args[1:] if isinstance(a, (int, sympy.Basic))]))}
    assert N + 5 in exprs  # reshape(B, N + T, heads, -1, 2) in apply_rotary_emb


def test_width_equal_to_token_count_is_not_mistaken(capture):
    """Tiny configs have width 16 == N 16: axes are tracked by position, not by size."""
    case = build_tiny("dit")
    gm, _ = capture(case.model, case.make_inputs())
    region = analyze_token_axis(gm)
    assert all(a.axis in (1, 2) for a in region.axes.values())
    assert region.templates == {}  # DiT's views all use -1 on the token axis


def test_unet_is_refused_with_a_reason(capture):
    case = build_tiny("unet")
    gm, _ = capture(case.model, case.make_inputs())
    with pytest.raises(TokenAxisError, match="not a \\(batch, tokens, width\\) sequence"):
        analyze_token_axis(gm)


# ------------------------------------------------------------------------------ the rule table
def test_every_rule_is_one_table_entry_and_unknown_ops_are_refused(capture):
    import operator

    import torch
    import torch.nn.functional as F

    from specdiff_fx.passes.token_axis import RULES, arg

    for key in [("call_function", F.scaled_dot_product_attention), ("call_function", operator.setitem),
                ("call_function", torch.view_as_complex), ("call_method", "type_as"),
                ("call_function", torch.empty_like), ("call_method", "view")]:
        assert key in RULES, key

    from specdiff_fx.passes.token_axis import TokenAxis, _Propagator

    class Cumsum(torch.nn.Module):
        def forward(self, x):
            return x.cumsum(1) + x.sin()

    gm, _ = capture(Cumsum(), dict(x=torch.randn(2, 6, 8)))
    prop = _Propagator(gm, 6)
    prop.axes[next(iter(gm.graph.find_nodes(op="placeholder")))] = TokenAxis(1, ((IMAGE, N),))
    for n in gm.graph.nodes:
        prop.visit(n)
    node = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "cumsum")
    assert "op not modelled" in prop.errors[node]
    assert any(n.target == "sin" for n in prop.axes)  # a table entry: the layout flows through
    assert arg(node, 1, "dim") == 1
    with pytest.raises(TokenAxisError, match="'dtype' missing"):
        arg(node, 2, "dtype")
    assert arg(node, 2, "dtype", None) is None


def test_key_side_masks_pass_and_query_side_masks_are_gathered(capture):
    pixart = build_tiny("pixart", text_mask=True)            # cross-attention, mask (B, 1, 1, T)
    gm, _ = capture(pixart.model, pixart.make_inputs())
    region = analyze_token_axis(gm)
    assert len(region.sites) == 4 and not any(p[1] == "attn_mask" or p[1] == 3 for p in region.position_operands)
    chroma = build_tiny("chroma")                             # joint attention, mask (B, 1, T+N, T+N)
    gm, _ = capture(chroma.model, chroma.make_inputs())
    region = analyze_token_axis(gm)
    masked = [p for p in region.position_operands if p[1] == "attn_mask"]
    assert len(masked) == 3 and all(p[2] == 2 for p in masked)   # gathered on the mask's query axis
    assert {p[0] for p in masked} == {s.node for s in region.sites}


def test_rope_written_by_slice_assignment_is_in_the_region(capture):
    """CogView4 writes RoPE into query[:, :, T:] (setitem): the write, and the reshape that
    feeds it, belong to the region and are re-evaluated at k."""
    case = build_tiny("cogview4")
    gm, _ = capture(case.model, case.make_inputs())
    region = analyze_token_axis(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    import operator
    writes = [n for n in region.region if nodes[n].target is operator.setitem]
    assert len(writes) == 4                                   # q and k in each of 2 blocks
    reshapes = [n for n in region.templates if nodes[n].target == "reshape"]
    assert reshapes, "the RoPE reshape of the image part must take its extent from N"


@pytest.mark.parametrize("family", ["qwen_image", "wan"])
def test_complex_rope_and_type_as_and_dual_stream_exit(family, capture):
    case = build_tiny(family)
    gm, _ = capture(case.model, case.make_inputs())
    region = analyze_token_axis(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert region.axes[region.exit] == region.axes[region.entry]
    import torch
    if family == "qwen_image":   # complex RoPE: view_as_complex, multiply by a gathered table
        assert any(nodes[n].target is torch.view_as_complex for n in region.region)
        assert region.position_operands
    else:                        # Wan: RoPE into empty_like halves; type_as after the exit
        assert any(nodes[n].target is torch.empty_like for n in region.region)


def test_fp16_clip_is_token_wise(capture):
    """In float16 diffusers clips FLUX/Chroma block outputs (``hidden_states.clip(-65504, 65504)``):
    a token-wise method, so the region still reaches the exit through it."""
    import torch

    case = build_tiny("chroma")
    inputs = {k: v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in case.make_inputs().items()}
    gm, _ = capture(case.model.half(), inputs)
    assert any(n.target == "clip" for n in gm.graph.nodes)
    region = analyze_token_axis(gm)
    assert len(region.sites) == 3
