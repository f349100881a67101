"""graph_copy.eliminate_dead_code_keeping_writes on small hand-built graphs.

fx counts ``x.copy_(y)`` as pure and its result is unused, so plain dead-code elimination
drops it even when ``x`` is read afterwards.  diffusers builds its gathered attention mask
that way under context parallelism (``t = empty_like(m); t.copy_(part); cat([t, ...])``);
dropping the copies made the attention read uninitialized memory.
"""

import operator

import torch
import torch.fx as fx

from specdiff_fx.passes.graph_copy import eliminate_dead_code_keeping_writes, tag_inserted


def _dce(g: fx.Graph) -> fx.GraphModule:
    gm = fx.GraphModule(torch.nn.Module(), g)
    eliminate_dead_code_keeping_writes(gm)
    gm.recompile()
    return gm


def _methods(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_method"]


def test_keeps_copies_into_buffers_that_are_read():
    """``t = empty_like(x); t.copy_(y[:2]); t1 = ...; cat([t, t1])``: both copies stay."""
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    parts = []
    for lo in (0, 2):
        buf = g.call_function(torch.empty_like, (x,))
        g.call_method("copy_", (buf, g.call_function(operator.getitem, (y, slice(lo, lo + 2)))))
        parts.append(buf)
    g.output((g.call_function(operator.add, (g.call_function(torch.cat, (parts, -1)), 1.0)),))
    gm = _dce(g)
    assert _methods(gm) == ["copy_", "copy_"]
    x, y = torch.randn(2, 3), torch.randn(4, 3)
    torch.testing.assert_close(gm(x, y)[0], torch.cat([y[:2], y[2:]], -1) + 1, rtol=0, atol=0)


def test_drops_a_copy_into_a_buffer_nothing_reads():
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    buf = g.call_function(torch.empty_like, (x,))
    g.call_method("copy_", (buf, g.call_function(operator.mul, (y, 3.0))))
    g.output((g.call_function(operator.add, (x, 1.0)),))
    gm = _dce(g)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "placeholder", "call_function", "output"]
    assert not _methods(gm)


def test_keeps_writes_through_views_of_a_buffer_read_through_another_view():
    """``v = empty_like(x); v[0:2].copy_(a); v[2:4].copy_(b); v.view(-1) * 2``."""
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    buf = g.call_function(torch.empty_like, (x,))
    for lo in (0, 2):
        part = g.call_function(operator.getitem, (buf, slice(lo, lo + 2)))
        src = g.call_function(operator.getitem, (y, slice(lo, lo + 2)))
        g.call_method("copy_", (part, g.call_function(operator.mul, (src, 5.0))))
    dead = g.call_function(torch.empty_like, (x,))  # written through a view, never read
    g.call_method("copy_", (g.call_method("view", (dead, -1)), g.call_method("view", (y, -1))))
    g.output((g.call_function(operator.mul, (g.call_method("view", (buf, -1)), 2.0)),))
    gm = _dce(g)
    assert _methods(gm).count("copy_") == 2
    assert sum(n.target is torch.empty_like for n in gm.graph.nodes) == 1
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(gm(x, y)[0], (y * 5).view(-1) * 2, rtol=0, atol=0)


def test_keeps_writes_into_graph_inputs_and_tagged_writes():
    """A write into an input is seen by the caller; a rewrite's tagged cache write is the point."""
    g = fx.Graph()
    x, cache = g.placeholder("x"), g.placeholder("cache")
    g.call_method("mul_", (g.call_function(operator.getitem, (x, 0)), 2.0))  # into a view of an input
    out = g.call_function(operator.add, (x, 1.0))
    tag_inserted(g.call_method("copy_", (cache, g.call_method("detach", (out,)))), "record", out, writes=True)
    g.output((out,))
    gm = _dce(g)
    assert _methods(gm) == ["mul_", "detach", "copy_"]
    x, cache = torch.ones(2, 3), torch.zeros(2, 3)
    (got,) = gm(x, cache)
    want = torch.tensor([[3.0] * 3, [2.0] * 3])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(cache, want, rtol=0, atol=0)
