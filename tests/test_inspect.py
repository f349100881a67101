"""The inspection tool: reports per family, graph diffs, symbolic cost, CLI and HTML in a browser."""

import contextlib
import io
import shutil
import subprocess

import pytest
import sympy
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from specdiff_fx.cli import main as cli_main
from specdiff_fx import make_backend
from specdiff_fx.inspect import capture_graph, diff, inspect_compiled, inspect_graph, render_text
from specdiff_fx.inspect import build_report
from specdiff_fx.inspect.cost import B, D, K_SUBSET, N, T, ModelSizes
from specdiff_fx.inspect.html import write_html
from specdiff_fx.passes import copy_graph_module
from specdiff_fx.passes.residual_branches import count_kinds
from specdiff_fx.passes.token_axis import analyze_token_axis
from specdiff_fx.passes.token_variants import (
    build_token_draft_variant,
    build_token_partial_variant,
    build_token_record_variant,
)
from specdiff_fx.testing.tiny_models import build_tiny
from test_residual_branches import EXPECTED

FAMILIES = sorted(EXPECTED)


@pytest.fixture(scope="module")
def captured():
    """family -> (graph, example inputs, fora report); each family is traced once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            case = build_tiny(family)
            gm, example = capture_graph(case.model, case.make_inputs())
            cache[family] = gm, example, inspect_graph(gm, example, "fora", family)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_report_lists_expected_branches_and_inserted_kinds(family, captured):
    gm, _, report = captured(family)
    branches = [b.branch for b in report.branches]
    assert count_kinds(branches) == EXPECTED[family]
    text = render_text(report)
    assert all(b.name in text for b in branches)

    variants = {v.name: v for v in report.variants}
    assert set(variants) == {"full", "reuse"}
    n = len(branches)
    assert variants["full"].diff.kinds() == {"branch_cache_input": n, "branch_record": 2 * n}
    reuse_kinds = variants["reuse"].diff.kinds()
    assert reuse_kinds["branch_cache_input"] == n and 0 < reuse_kinds["branch_reuse"] <= n
    assert not variants["full"].diff.of("removed"), "recording computes everything"

    for change in variants["full"].diff.of("added"):
        if change.kind == "branch_record":  # inserted nodes sit in the block of their residual
            assert change.block in {b.block for b in branches}
    for info in report.branches:
        assert info.status["full"].startswith("computed") and "branch_record" in info.status["full"]
        assert info.levels == ("branch",)
        if info.branch.stream != "context":  # a dead text stream may lose its consumer too
            assert info.status["reuse"] == "skipped · branch_reuse"
    assert all(site.status["reuse"].startswith("skipped") for site in report.attention)
    assert len(report.attention) == sum(1 for node in gm.graph.nodes
                                        if node.target is torch.nn.functional.scaled_dot_product_attention)


def test_unchanged_graph_has_empty_diff(captured):
    gm, example, _ = captured("dit")
    assert diff(gm, gm).is_empty
    assert diff(gm, copy_graph_module(gm)).is_empty
    off = inspect_graph(gm, example, "off", "dit")
    (variant,) = off.variants
    assert variant.diff.is_empty and variant.diff.counts() == {"added": 0, "removed": 0, "changed": 0}
    assert off.flop_ratio(variant) == 1.0 and variant.cache.value == 0
    assert "(identical)" in render_text(off, code_diff=True)


def test_diff_names_kinds_modules_and_code(captured):
    gm, _, report = captured("dit")
    reuse = next(v for v in report.variants if v.name == "reuse")
    removed = {c.name: c for c in reuse.diff.of("removed")}
    assert removed["hidden_states_1"].target == "scaled_dot_product_attention"
    assert removed["hidden_states_1"].module == "transformer_blocks.0.attn1"
    changed = reuse.diff.of("changed")
    assert {c.kind for c in changed} == {"branch_reuse"}
    assert {c.block for c in changed} == {"transformer_blocks.0", "transformer_blocks.1"}
    assert "+    attn_output = unsqueeze * specdiff_cache_0" in reuse.diff.code_diff
    assert "-    hidden_states_1 = torch._C._nn.scaled_dot_product_attention(" in reuse.diff.code_diff
    rows = reuse.diff.grouped(by_module=True)
    assert ("removed", "-", "transformer_blocks.0.attn1.to_q", 1, "linear") in rows


def _counted_flops(gm, args):
    """FlopCounterMode's count; the math kernel makes attention two counted bmm's on CPU."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        gm(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("family", FAMILIES)
def test_symbolic_flops_agree_with_flop_counter(family, captured):
    gm, example, report = captured(family)
    caches = [torch.zeros(s.shape, dtype=s.dtype) for s in report.buffers]
    assert report.original_flops.value == pytest.approx(_counted_flops(gm, example), rel=0.05)
    for variant in report.variants:
        counted = _counted_flops(variant.graph, example + caches)
        assert variant.flops.value == pytest.approx(counted, rel=0.05), variant.name
    assert {B, N, D} <= report.original_flops.expr.free_symbols
    assert sum(s.nbytes for s in report.buffers) == report.variants[0].cache.value


def test_symbols_follow_roles_not_values(captured):
    """The tiny DiT has N = d = 16: attention must still read 4·B·N²·d + 8·B·N·d²."""
    _, _, report = captured("dit")
    attn = next(b for b in report.branches if b.branch.kind == "self_attention")
    assert sympy.expand(attn.flops - (4 * B * N**2 * D + 8 * B * N * D**2)) == 0
    assert "L" in {str(s) for s in report.original_flops.expr.free_symbols}
    sizes = ModelSizes(batch=2, tokens=16, width=16, text_tokens=5)
    assert sizes.sequence(21) == N + T and sizes.channels(96) == 6 * D and sizes.channels(12) == 12


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_token_variants_show_new_kinds_and_cost_at_k(family, captured):
    """Variants built by the token-level passes: new tags, ``k`` in the formulas, exact FLOPs."""
    gm, example, _ = captured(family)
    region = analyze_token_axis(gm)
    k = 8
    built = {"full": build_token_record_variant(gm, region), "partial": build_token_partial_variant(gm, region, k),
             "draft": build_token_draft_variant(gm, region)}
    report = build_report(gm, {n: g for n, (g, _) in built.items()}, {n: s for n, (_, s) in built.items()},
                          "token", family)
    variants = {v.name: v for v in report.variants}
    assert report.sizes.subset == k and K_SUBSET in variants["partial"].flops.expr.free_symbols
    kinds = variants["partial"].diff.kinds()
    assert {"token_gather", "kv_completion", "token_compose"} <= set(kinds)
    assert "importance_score" in variants["draft"].diff.kinds()
    assert all(not v.notes for v in report.variants), [v.notes for v in report.variants]
    self_sites = [a for a in report.attention if a.kind in ("self", "joint")]
    assert self_sites
    for site in self_sites:  # queries: the k computed tokens (+ text); keys: completed from caches
        assert site.status["partial"].startswith(("computed on k tokens", "computed on T + k tokens"))
        assert "kv_completion" in site.status["partial"]
    assert {"token"} <= {level for b in report.branches for level in b.levels}
    for name, (graph, specs) in built.items():
        buffers = [torch.arange(s.shape[-1]).expand(s.shape).contiguous() if s.role == "index"
                   else torch.zeros(s.shape, dtype=s.dtype) for s in specs]
        counted = _counted_flops(graph, example + buffers)
        assert variants[name].flops.value == pytest.approx(counted, rel=0.05), name
    assert variants["partial"].flops.value < report.original_flops.value < variants["full"].flops.value


def test_inspect_a_compiled_model():
    """The report reads the graphs and per-variant buffers the backend built for a compiled model
    (specdiff here; fora goes through the same backend path in every other test)."""
    case = build_tiny("dit")
    backend = make_backend(policy="specdiff", compiler="eager", cache_ratio=0.5)
    compiled = torch.compile(case.model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(**case.make_inputs())
    report = inspect_compiled(compiled)
    assert [v.name for v in report.variants] == ["full", "partial", "draft"]
    assert report.title == "DiTTransformer2DModel"
    assert all(not v.notes for v in report.variants), "every variant ran on fake inputs with its buffers"
    assert report.variants[0].cache.value == sum(b.nbytes for b in report.buffers) > 0
    assert report.sizes.subset == 8 and report.flop_ratio(report.variants[1]) < 1


def tiny_factory():
    """A ``module:factory`` model spec for the CLI test."""
    case = build_tiny("pixart")
    return case.model, case.make_inputs()


def test_cli_text_html_and_errors(tmp_path):
    out, page = io.StringIO(), tmp_path / "pixart.html"
    with contextlib.redirect_stdout(out):
        rc = cli_main(["inspect", f"{__name__}:tiny_factory", "--policy", "fora", "--html", str(page)])
    text = out.getvalue()
    assert rc == 0 and page.exists()
    for expected in ("Residual branches", "transformer_blocks.1:cross_attention", "branch_reuse",
                     "× original", "FLOPs(reuse) ="):
        assert expected in text
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli_main(["inspect", "no_such_family"]) == 2
    assert "module:factory" in err.getvalue()


def test_html_report_renders_in_headless_chromium(captured, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); the HTML test needs a real browser")
    _, _, report = captured("sd3")
    page = tmp_path / "sd3.html"
    write_html(report, str(page))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count('<details class="block"') == len(report.blocks())
    for branch in report.branches:
        assert branch.branch.name in dom
    for marker in ('class="diff_add"', 'class="diff_sub"', "branch_reuse", "branch_record", "specdiff_cache_0",
                   "× original", "joint"):
        assert marker in dom, marker


@pytest.mark.parametrize("config", [dict(policy="fora"), dict(policy="taylor", lite=True, probe=True),
                                    dict(policy="taylor", lite=False, probe=True),
                                    dict(policy="specdiff", c3="forecast", partial_every=2, kv_forecast=True)],
                         ids=["fora", "taylor-lite-probe", "taylor-branch-probe", "specdiff-forecast"])
def test_every_tag_and_variant_a_policy_builds_is_declared(config):
    """The report's caching levels and 'runs at' come from the passes' and policies' own tables
    (passes/tags.py, Policy.runs_at): a tag or variant a policy builds that no table declares fails here."""
    from specdiff_fx.inspect.report import inspect_runtime
    from specdiff_fx.passes.tags import CACHING_LEVELS
    from specdiff_fx.policies import POLICIES

    case = build_tiny("sd3")
    gm, example = capture_graph(case.model, case.make_inputs())
    runtime = make_backend(compiler="eager", **config).build_runtime(gm, example)
    assert runtime.fallback is None, runtime.fallback
    tags = {n.meta["specdiff"] for name, g in runtime.graphs.items() if name != "original"
            for n in g.graph.nodes if "specdiff" in n.meta}
    assert tags and tags <= set(CACHING_LEVELS), tags - set(CACHING_LEVELS)
    assert set(runtime.variants) <= set(POLICIES[runtime.policy].runs_at)
    report = inspect_runtime(runtime)
    assert all(v.runs_at != "-" for v in report.variants), [(v.name, v.runs_at) for v in report.variants]
    levels = {level for b in report.branches for level in b.levels}
    assert levels and levels <= set(CACHING_LEVELS.values()) | {"token"}
