"""prune_dead_collectives and collectives_summary on small hand-built graphs.

Graphs are built node by node with ``torch.ops._c10d_functional`` calls, the way dynamo
records diffusers' context-parallel attention.  Running them needs a process group: a
one-rank gloo group in this process is enough to check that pruning keeps the outputs.
"""

import datetime
import operator

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # noqa: F401  (registers the ops)
import torch.fx as fx

from specdiff_fx.inspect.collective_traffic import collectives_summary
from specdiff_fx.passes.collectives import find_collectives, has_collectives, is_wait, output_group
from specdiff_fx.passes.prune_collectives import prune_dead_collectives
from specdiff_fx.passes.rank_partials import RANK_PARTIAL, has_rank_partials, reduce_rank_partials
from specdiff_fx.passes.residual_branches import ResidualBranch

c10d = torch.ops._c10d_functional


@pytest.fixture(scope="module")
def group_name(tmp_path_factory):
    """A one-rank gloo group, so the graphs can run (collectives are then identities)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    path = tmp_path_factory.mktemp("pg") / "init"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def _meta(node, *shape, dtype=torch.float32):
    node.meta["example_value"] = torch.empty(shape, dtype=dtype, device="meta")
    return node


def _module(node, path):
    node.meta["nn_module_stack"] = {path: (f"L['self'].{path}", torch.nn.Module)}
    return node


def build_graph(group: str = "no-such-group", ranks: int = 1) -> fx.GraphModule:
    """x (4, 8), cache (4, 8) ->
    live : a2a(x * 2) -> wait -> + gathered    (reaches the output)
    dead : a2a(x + 1) -> wait -> relu          (reaches nothing)
    write: all_reduce(x) -> wait -> cache.copy_ (a side effect: kept)
    out  : all_gather(live) -> wait            (reaches the output)
    """
    g = fx.Graph()
    x = _meta(g.placeholder("x"), 4, 8)
    cache = _meta(g.placeholder("cache"), 4, 8)
    split = [4 // ranks] * ranks

    x2 = _module(_meta(g.call_function(operator.mul, (x, 2.0)), 4, 8), "blocks.0.attn")
    a2a = _module(_meta(g.call_function(c10d.all_to_all_single, (x2, split, split, group)), 4, 8), "blocks.0.attn")
    live = _module(_meta(g.call_function(c10d.wait_tensor, (a2a,)), 4, 8), "blocks.0.attn")

    x1 = _module(_meta(g.call_function(operator.add, (x, 1.0)), 4, 8), "blocks.1.attn")
    a2a_dead = _module(_meta(g.call_function(c10d.all_to_all_single, (x1, split, split, group)), 4, 8),
                       "blocks.1.attn")
    waited = _module(_meta(g.call_function(c10d.wait_tensor, (a2a_dead,)), 4, 8), "blocks.1.attn")
    _meta(g.call_method("relu", (waited,)), 4, 8)

    red = _meta(g.call_function(c10d.all_reduce, (x, "sum", group)), 4, 8)
    red_w = _meta(g.call_function(c10d.wait_tensor, (red,)), 4, 8)
    g.call_method("copy_", (cache, red_w))

    gat = _module(_meta(g.call_function(c10d.all_gather_into_tensor, (live, ranks, group)), 4 * ranks, 8),
                  "proj_out")
    gat_w = _module(_meta(g.call_function(c10d.wait_tensor, (gat,)), 4 * ranks, 8), "proj_out")
    out = g.call_function(operator.add, (gat_w, 1.0))
    g.output((out,))
    return fx.GraphModule(torch.nn.Module(), g)


def _ops(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "c10d" in str(n.target)]


def test_prunes_only_the_dead_collective_and_its_wait():
    gm = build_graph()
    before = gm.code
    pruned = prune_dead_collectives(gm)
    assert gm.code == before, "the input graph must not change"
    assert pruned is not gm
    names = {n.name for n in pruned.graph.nodes}
    assert "all_to_all_single_1" not in names and "wait_tensor_1" not in names
    assert "add" not in names and "relu" not in names, "the pure nodes that only fed it go too"
    # the live all-to-all, the all_reduce feeding a cache write, the output gather stay
    assert [collective for collective in _ops(pruned) if "wait" not in collective] == [
        "_c10d_functional.all_to_all_single", "_c10d_functional.all_reduce",
        "_c10d_functional.all_gather_into_tensor"]
    assert sum(is_wait(n) for n in pruned.graph.nodes) == 3
    assert len(find_collectives(gm)) == 4 and len(find_collectives(pruned)) == 3


def test_every_kept_collective_keeps_its_wait():
    pruned = prune_dead_collectives(build_graph())
    for node in find_collectives(pruned):
        assert any(is_wait(u) for u in node.users), node.name


def test_pruning_is_deterministic_and_idempotent():
    """Structural only: two ranks' identical graphs give identical pruned graphs."""
    a, b = prune_dead_collectives(build_graph()), prune_dead_collectives(build_graph())
    assert a.code == b.code
    assert prune_dead_collectives(a).code == a.code


def test_graph_without_collectives_is_unchanged():
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_method("relu", (x,))
    g.call_method("sigmoid", (x,))  # dead and pure: removed, as dead-code elimination would
    g.output((y,))
    gm = fx.GraphModule(torch.nn.Module(), g)
    pruned = prune_dead_collectives(gm)
    assert not has_collectives(pruned)
    assert [n.target for n in pruned.graph.nodes if n.op == "call_method"] == ["relu"]
    x = torch.randn(3)
    torch.testing.assert_close(pruned(x)[0], x.relu())


def test_pruned_graph_computes_the_same(group_name):
    gm = build_graph(group_name)
    pruned = prune_dead_collectives(gm)
    x = torch.randn(4, 8)
    cache_a, cache_b = torch.zeros(4, 8), torch.zeros(4, 8)
    (ref,) = gm(x, cache_a)
    (got,) = pruned(x, cache_b)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(cache_b, x, rtol=0, atol=0)  # the side effect still happens
    torch.testing.assert_close(ref, x * 2 + 1)


def test_coalesced_collective_kept_with_all_its_waits():
    """One result of a coalesced gather is used: the op and *both* waits stay."""
    g = fx.Graph()
    a, b = _meta(g.placeholder("a"), 2, 4), _meta(g.placeholder("b"), 3, 4)
    co = g.call_function(c10d.all_gather_into_tensor_coalesced, ([a, b], 2, "no-such-group"))
    co.meta["example_value"] = [torch.empty(4, 4, device="meta"), torch.empty(6, 4, device="meta")]
    first = g.call_function(operator.getitem, (co, 0))
    second = g.call_function(operator.getitem, (co, 1))
    w0 = g.call_function(c10d.wait_tensor, (first,))
    g.call_function(c10d.wait_tensor, (second,))
    g.output((w0,))
    gm = fx.GraphModule(torch.nn.Module(), g)
    pruned = prune_dead_collectives(gm)
    assert len(find_collectives(pruned)) == 1
    assert sum(is_wait(n) for n in pruned.graph.nodes) == 2
    call = collectives_summary(gm, branches=[]).calls[0]
    assert call.bytes == (4 * 4 + 6 * 4) * 4 and call.group_size == 2  # output bytes


def test_fully_dead_coalesced_collective_goes():
    g = fx.Graph()
    a = _meta(g.placeholder("a"), 2, 4)
    co = g.call_function(c10d.all_reduce_coalesced, ([a], "sum", "no-such-group"))
    w = g.call_function(c10d.wait_tensor, (g.call_function(operator.getitem, (co, 0)),))
    g.call_method("relu", (w,))
    g.output((a,))
    pruned = prune_dead_collectives(fx.GraphModule(torch.nn.Module(), g))
    assert not has_collectives(pruned) and not any(is_wait(n) for n in pruned.graph.nodes)


def _gathered_mask_graph(group: str, read: bool) -> fx.GraphModule:
    """diffusers' gathered text mask under context parallelism: ``t = empty_like(mask);
    t.copy_(wait(all_gather(mask)))``, then ``cat([t, x])`` feeds the output -- or, with
    ``read=False``, nothing reads ``t`` (its attention was cached away)."""
    g = fx.Graph()
    x, mask = _meta(g.placeholder("x"), 2, 3), _meta(g.placeholder("mask"), 2, 3)
    buf = _meta(g.call_function(torch.empty_like, (mask,)), 2, 3)
    gathered = _meta(g.call_function(c10d.all_gather_into_tensor, (mask, 1, group)), 2, 3)
    waited = _meta(g.call_function(c10d.wait_tensor, (gathered,)), 2, 3)
    g.call_method("copy_", (buf, g.call_function(operator.getitem, (waited, slice(0, 2)))))
    out = g.call_function(torch.cat, ([buf, x], -1)) if read else g.call_function(operator.add, (x, 1.0))
    g.output((out,))
    return fx.GraphModule(torch.nn.Module(), g)


def test_copy_into_a_read_buffer_stays_with_its_gather(group_name):
    gm = _gathered_mask_graph(group_name, read=True)
    pruned = prune_dead_collectives(gm)
    assert [n.target for n in pruned.graph.nodes if n.op == "call_method"] == ["copy_"]
    assert len(find_collectives(pruned)) == 1
    x, mask = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(pruned(x, mask)[0], torch.cat([mask, x], -1), rtol=0, atol=0)


def test_copy_into_a_dead_buffer_does_not_pin_its_gather():
    """An in-place write is no root: into a tensor nothing reads, it goes, and its gather too."""
    pruned = prune_dead_collectives(_gathered_mask_graph("no-such-group", read=False))
    assert not has_collectives(pruned) and not any(is_wait(n) for n in pruned.graph.nodes)
    assert [n.op for n in pruned.graph.nodes] == ["placeholder", "placeholder", "call_function", "output"]


def test_summary_counts_bytes_modules_and_branches():
    gm = build_graph(ranks=2)
    branch = ResidualBranch(
        name="blocks.1:self_attention", owner="blocks.1", block="blocks.1", kind="self_attention",
        stream="image", add="none", source="x", output="relu", gate=None, cached="relu",
        body=("add", "all_to_all_single_1", "wait_tensor_1", "relu"), shape=(1, 4, 8),
    )
    s = collectives_summary(gm, branches=[branch])
    assert s.count == 4
    assert s.counts() == {"all_to_all_single": 2, "all_reduce": 1, "all_gather_into_tensor": 1}
    by_node = {c.node: c for c in s.calls}
    a2a = by_node["all_to_all_single"]
    assert (a2a.kind, a2a.module, a2a.block, a2a.branch) == ("all_to_all", "blocks.0.attn", "blocks.0", None)
    assert a2a.group_size == 2 and a2a.bytes == 4 * 8 * 4 and a2a.bus_bytes == 64  # (n-1)/n of 128
    dead = by_node["all_to_all_single_1"]
    assert dead.branch == "blocks.1:self_attention" and dead.tokens == 4
    gather = by_node["all_gather_into_tensor"]
    assert gather.bytes == 8 * 8 * 4 and gather.bus_bytes == 128 and gather.module == "proj_out"
    reduce = by_node["all_reduce"]
    assert reduce.group_size is None and reduce.bus_bytes is None  # no group size in the graph
    assert s.total_bytes() == 128 + 128 + 128 + 256
    assert s.total_bus_bytes() is None
    assert s.by_branch() == {"<outside>": 3, "blocks.1:self_attention": 1}
    assert collectives_summary(gm, branches=[branch], group_size=2).total_bus_bytes() == 64 + 64 + 128 + 128  # all_reduce: 2(n-1)/n of 128
    assert s.as_dict()["counts"] == s.counts()


def test_summary_resolves_group_size_from_live_group(group_name):
    s = collectives_summary(build_graph(group_name), branches=[])
    reduce = next(c for c in s.calls if c.op == "all_reduce")
    assert reduce.group_size == 1 and reduce.bus_bytes == 0


# ----------------------------------------------------------------------------- rank partials
def _partial_graph(group: str = "no-such-group") -> fx.GraphModule:
    """x (4, 8) -> err = sum|x| (a rank-local partial, tagged) / 2 -> err; plus a gathered output."""
    g = fx.Graph()
    x = _meta(g.placeholder("x"), 4, 8)
    total = _meta(g.call_function(torch.sum, (g.call_function(torch.abs, (x,)),)))
    total.meta[RANK_PARTIAL] = "sum"
    err = _meta(g.call_function(operator.truediv, (total, 2.0)))
    gat = _meta(g.call_function(c10d.all_gather_into_tensor, (x, 1, group)), 4, 8)
    gat_w = _meta(g.call_function(c10d.wait_tensor, (gat,)), 4, 8)
    g.output((gat_w, err))
    return fx.GraphModule(torch.nn.Module(), g)


def test_reduce_rank_partials_inserts_one_all_reduce_before_every_reader():
    gm = _partial_graph()
    before = gm.code
    reduced = reduce_rank_partials(gm, "grp")
    assert gm.code == before and has_rank_partials(gm)
    ar = [n for n in find_collectives(reduced) if "all_reduce" in str(n.target)]
    assert len(ar) == 1 and ar[0].args[1:] == ("sum", "grp") and ar[0].args[0].name == "sum_1"
    (wait,) = [u for u in ar[0].users if is_wait(u)]
    div = next(n for n in reduced.graph.nodes if n.target is operator.truediv)
    assert div.args[0] is wait, "the decision reads the reduced value"
    assert list(ar[0].args[0].users) == [ar[0]], "nothing reads the local partial any more"
    assert has_rank_partials(gm) and not has_rank_partials(reduced)
    assert reduce_rank_partials(reduced, "grp").code == reduced.code, "reduced once"
    untagged = build_graph()
    assert not has_rank_partials(untagged) and reduce_rank_partials(untagged, "grp").code == untagged.code


def test_reduced_partial_survives_pruning_and_runs(group_name):
    gm = _partial_graph(group_name)
    reduced = prune_dead_collectives(reduce_rank_partials(gm, group_name))
    assert sum("all_reduce" in str(n.target) for n in find_collectives(reduced)) == 1
    x = torch.randn(4, 8)
    for got, want in zip(reduced(x), gm(x)):  # one rank: the all-reduce is the identity
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_output_group_names_the_group_gathering_the_output():
    assert output_group(build_graph("exit-group")) == "exit-group"
    g = fx.Graph()
    x = g.placeholder("x")
    g.output((g.call_method("relu", (x,)),))
    assert output_group(fx.GraphModule(torch.nn.Module(), g)) is None
