import pytest
import sympy

from specdiff_fx.passes.token_axis import IMAGE, TEXT, N, TokenAxisError, analyze_token_axis
from specdiff_fx.tiny_models import build_tiny

# (family, attention sites with image keys, sites total, joint text tokens in the layout)
EXPECTED = {
    "dit": (2, 2, None),
    "pixart": (2, 4, None),          # 2 self + 2 cross (keys are text: no K/V completion)
    "sd3": (2, 2, "after"),          # joint: [image, text]
    "flux": (2, 2, "before"),        # joint: [text, image]
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
    # RoPE cos/sin tables meet q and k of both blocks: 2 tables x 2 tensors x 2 blocks
    assert len(region.position_operands) == 8
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
