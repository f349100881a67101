"""``specdiff-fx inspect`` on a model the backend falls back on still writes its report
(text and HTML, exit 0): the branches and attention sites found and the fallback reason,
which names the node the passes stopped at."""

import contextlib
import io

import torch

from specdiff_fx.cli import main as cli_main
from specdiff_fx.inspect.html import render_html
from specdiff_fx.inspect.report import inspect_model
from specdiff_fx.testing.tiny_models import build_tiny


def test_report_of_a_fallback_names_the_reason_and_keeps_branches_and_sites():
    case = build_tiny("sana")        # linear attention (a matmul contracting the tokens) is not supported
    report = inspect_model(case.model, case.make_inputs(), "specdiff", "sana")
    assert report.fallback and "token-level caching not possible" in report.fallback
    assert "%scores" in report.fallback and "linear attention" in report.fallback  # the node it stopped at
    assert len(report.branches) >= 6                                        # attn1, attn2, ff per block
    assert len(report.attention) == 2                                       # the two cross-attentions
    assert [v.name for v in report.variants] == ["full"]
    assert report.variants[0].graph is report.original                      # what the fallback runs
    page = render_html(report)
    assert "Fallback:" in page and "%scores" in page


def test_supported_model_has_no_fallback():
    case = build_tiny("dit")
    report = inspect_model(case.model, case.make_inputs(), "specdiff", "dit")
    assert report.fallback is None and len(report.variants) == 3


def test_cli_writes_text_and_html_with_exit_zero_on_fallback(tmp_path):
    torch._dynamo.reset()
    out, page = io.StringIO(), tmp_path / "sana.html"
    with contextlib.redirect_stdout(out):
        rc = cli_main(["inspect", "sana", "--policy", "specdiff", "--html", str(page)])
    text = out.getvalue()
    assert rc == 0 and page.exists()
    assert "FALLBACK: policy specdiff compiles this graph plainly" in text
    assert "linear attention: matmul contracts the token axis" in text
    assert "Residual branches" in text and "Attention sites" in text
    assert "Fallback:" in page.read_text()


def test_graph_breaking_models_report_every_frame(tmp_path):
    """Where diffusers code breaks the graph (HiDream's MoE routing, Lumina2's ``.tolist()``),
    inspect compiles the model as a user would and reports the frame that caches, listing every
    frame with what the backend did with it; under specdiff the blocks' frame falls back."""
    torch._dynamo.reset()
    case = build_tiny("hidream")
    fora = inspect_model(case.model, case.make_inputs(), "fora", "hidream")
    assert fora.frames and "frames, 2 with caching" in fora.frames[0]
    assert fora.fallback is None and len(fora.branches) == 2 and {"full", "reuse"} <= {v.name for v in fora.variants}
    assert any("caches 2 branches" in line for line in fora.frames[1:])
    torch._dynamo.reset()
    out, page = io.StringIO(), tmp_path / "lumina2.html"
    with contextlib.redirect_stdout(out):
        rc = cli_main(["inspect", "lumina2", "--policy", "specdiff", "--html", str(page)])
    text = out.getvalue()
    assert rc == 0 and "GRAPH BREAKS: dynamo cannot trace one graph" in text
    assert "0 with caching" in text and "FALLBACK" in text and "no timestep input found" in text
    assert "Graph breaks:" in page.read_text()
