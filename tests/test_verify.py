"""Build-time verification on fake tensors (passes/verify.py) and its use by the backend."""

import warnings

import pytest
import torch

from specdiff_fx.passes.graph_copy import copy_graph_module
from specdiff_fx.passes.graph_queries import tensor_meta
from specdiff_fx.passes.token_axis import analyze_token_axis
from specdiff_fx.passes.token_variants import build_token_partial_variant
from specdiff_fx.passes.verify import (
    VariantVerificationError,
    output_signature,
    verify_variant,
    with_fake_values,
)
from specdiff_fx.testing.tiny_models import build_tiny

from helpers import compile_with, run_steps


def _partial_examples(example, specs, n):
    out = list(example)
    for s in specs:
        if s.role == "index":
            out.append(torch.arange(s.shape[1]).expand(s.shape).contiguous())
        else:
            out.append(torch.zeros(s.shape, dtype=s.dtype))
    return out


def test_a_correct_variant_verifies_and_gets_shapes_at_k(capture):
    case = build_tiny("flux")
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    partial, specs = build_token_partial_variant(gm, region, 4)
    before = gm.code
    values = verify_variant(partial, _partial_examples(example, specs, region.num_tokens), output_signature(gm))
    assert gm.code == before
    with_fake_values(partial, values)
    # the first block's attention now runs on 4 image tokens (+ 5 text), not 16
    site = next(n for n in partial.graph.nodes if n.name == region.sites[0].node)
    assert tensor_meta(site).shape[2] == 4 + 5
    assert all(n.meta["example_value"] is values[n.name] for n in partial.graph.nodes if n.name in values)
    gathered = next(n for n in partial.graph.nodes if n.meta.get("specdiff") == "token_gather"
                    and n.args[0].name == region.entry)
    assert tuple(tensor_meta(gathered).shape)[:2] == (2, 4)  # inserted nodes get metadata too


def test_a_constant_left_at_n_is_reported_at_its_node(capture):
    """The crash class seen on CogView4: one reshape still says N after the subset is gathered."""
    case = build_tiny("flux")
    gm, example = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    broken = dict(region.templates)
    name = next(k for k, (args, _) in broken.items() if any(getattr(a, "free_symbols", None) for a in args[1:]))
    node = next(n for n in gm.graph.nodes if n.name == name)
    broken[name] = (node.args, dict(node.kwargs))      # forget that this reshape depends on N
    region.templates = broken
    partial, specs = build_token_partial_variant(gm, region, 4)
    with pytest.raises(VariantVerificationError) as info:
        verify_variant(partial, _partial_examples(example, specs, region.num_tokens), output_signature(gm))
    assert info.value.node == name
    assert name in str(info.value) and "RuntimeError" in str(info.value)


def test_an_output_of_another_shape_is_refused(capture):
    case = build_tiny("dit")
    gm, example = capture(case.model, case.make_inputs(batch=2))
    wrong = copy_graph_module(gm)
    out = next(iter(wrong.graph.find_nodes(op="output")))
    first = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    with wrong.graph.inserting_before(out):
        half = wrong.graph.call_function(torch.narrow, (first, 1, 0, 1))
    out.args = ((half,),) if isinstance(out.args[0], (tuple, list)) else (half,)
    wrong.recompile()
    with pytest.raises(VariantVerificationError, match="output 0"):
        verify_variant(wrong, example, output_signature(gm))
    assert verify_variant(gm, example, output_signature(gm))  # the original passes


def test_backend_falls_back_loudly_instead_of_failing_at_step_n(monkeypatch):
    """A builder bug that only shows at the first partial step becomes a build-time fallback."""
    import specdiff_fx.policies.specdiff as backend_module  # the policy that builds it

    real = backend_module.build_token_partial_variant

    def leave_one_reshape_at_n(gm, region, k):
        region.templates = {n: t for i, (n, t) in enumerate(region.templates.items()) if i}
        return real(gm, region, k)

    monkeypatch.setattr(backend_module, "build_token_partial_variant", leave_one_reshape_at_n)
    case = build_tiny("flux")
    compiled, _ = compile_with(case.model, policy="specdiff", compiler="eager", warmup_steps=1)
    with pytest.warns(RuntimeWarning, match="partial variant failed build-time verification at"):
        outs = run_steps(case, compiled, [1000.0, 800.0, 600.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = run_steps(case, case.model, [1000.0, 800.0, 600.0])
    torch.testing.assert_close(outs, expected)


def test_builders_raise_the_projects_unsupported_error(capture):
    """A builder that cannot proceed raises TokenAxisError (a fallback reason), not ValueError."""
    from specdiff_fx.passes.token_axis import TokenAxisError
    from specdiff_fx.passes.token_variants import build_token_record_variant

    case = build_tiny("dit")
    gm, _ = capture(case.model, case.make_inputs(batch=2))
    region = analyze_token_axis(gm)
    region.sites = []
    with pytest.raises(TokenAxisError, match="no self/joint attention site"):
        build_token_record_variant(gm, region)
