"""Token selection inside the partial variant (passes/token_select.py): the graph picks the
same tokens as the selection math run eagerly, writes its choice and the counts back, and
its output equals the partial variant fed that choice from outside."""

import pytest
import torch

from specdiff_fx.passes.token_axis import analyze_token_axis
from specdiff_fx.passes.token_ops import select_tokens
from specdiff_fx.passes.token_select import TokenSelectError, select_tokens_in_graph
from specdiff_fx.passes.token_variants import build_token_partial_variant, build_token_record_variant
from specdiff_fx.testing.tiny_models import build_tiny


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("family", ["dit", "sd3", "flux"])
def test_selection_in_graph_matches_the_eager_choice(family, capture):
    case = build_tiny(family)
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    record, rspecs = build_token_record_variant(gm, region)
    recorded = {s.name: torch.zeros(s.shape, dtype=s.dtype) for s in rspecs}
    with torch.no_grad():
        record(*example, *recorded.values())
    k, n = 5, region.num_tokens
    partial, specs = build_token_partial_variant(gm, region, k)
    selecting, sspecs = select_tokens_in_graph(partial, specs, k, c2_share=0.3, lam=1.0)
    assert partial.code != selecting.code and "select_tokens" not in partial.code
    assert [s.role for s in sspecs][:5] == ["his", "fut", "count", "index", "reuse_mask"]
    g = torch.Generator().manual_seed(1)
    his, fut = torch.rand(2, n, generator=g), torch.rand(2, n, generator=g)
    count = torch.randint(0, 4, (2, n), generator=g)
    want_index, want_reuse = select_tokens(his, fut, count, k, 0.3, 1.0)

    def buffers(spec_list, index=None, reuse=None):
        bufs = []
        for s in spec_list:
            value = {"his": his, "fut": fut, "count": count.clone(), "mix_weights": torch.tensor([0.5, 0.3, 0.2]),
                     "index": torch.zeros(s.shape, dtype=torch.long) if index is None else index,
                     "reuse_mask": torch.zeros(s.shape, dtype=torch.bool) if reuse is None else reuse}.get(s.role)
            if value is None:
                value = recorded.get(s.name, recorded["specdiff_history_out"]).clone()
            bufs.append(value)
        return bufs

    inside = buffers(sspecs)
    with torch.no_grad():
        got = _first(selecting(*example, *inside))
        want = _first(partial(*example, *buffers(specs, want_index, want_reuse)))
    roles = [s.role for s in sspecs]
    assert torch.equal(inside[roles.index("index")], want_index)
    assert torch.equal(inside[roles.index("reuse_mask")], want_reuse)
    expected_count = count + 1
    expected_count.scatter_(1, want_index, 0)
    assert torch.equal(inside[roles.index("count")], expected_count)
    assert torch.equal(got, want)


def test_selection_needs_the_partial_variants_inputs(capture):
    case = build_tiny("dit")
    gm, _ = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    partial, specs = build_token_partial_variant(gm, region, 4)
    with pytest.raises(TokenSelectError, match="subset size"):
        select_tokens_in_graph(partial, specs, 5, 0.3, 1.0)
    with pytest.raises(TokenSelectError, match="index"):
        select_tokens_in_graph(partial, [s for s in specs if s.role != "index"], 4, 0.3, 1.0)
