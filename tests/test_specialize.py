"""Symbolic buffer shapes (buffers.py) and the specialization of a dynamic graph (passes/specialize.py)."""

import sympy
import torch

from specdiff_fx.buffers import BufferRole, BufferSpec, ShapeBinding, same_shape, shape_exprs
from specdiff_fx.passes.graph_queries import tensor_meta
from specdiff_fx.passes.specialize import specialize_graph

s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)


def test_a_symbolic_spec_is_sized_at_each_calls_sizes():
    spec = BufferSpec("c", BufferRole.BRANCH_CACHE, (1, s0 * s1 // 4, 16), torch.float32, torch.device("cpu"))
    assert spec.symbolic
    assert spec.at({s0: 8, s1: 12}).shape == (1, 24, 16)
    assert spec.at({s0: 16, s1: 16}).shape == (1, 64, 16)
    static = BufferSpec("d", BufferRole.TAYLOR_COEF, (4,), torch.float32, torch.device("cpu"))
    assert not static.symbolic and static.at({}) is static
    try:
        spec.at({s0: 8})
    except ValueError as exc:
        assert "s1" in str(exc)
    else:
        raise AssertionError("a size no input gives must be an error")


def test_a_binding_reads_sizes_from_tensors_and_keeps_only_what_buffers_use():
    class Fake:  # the placeholders' fake values: a SymInt-free stand-in is enough for sources
        pass

    binding = ShapeBinding(((s0, 2, None), (s0, 0, 1), (s1, 0, 2), (sympy.Symbol("t"), 3, None)))
    spec = BufferSpec("c", BufferRole.BRANCH_CACHE, (1, s0, s1), torch.float32, torch.device("cpu"))
    narrowed = binding.only([spec])
    assert narrowed.sources == ((s0, 0, 1), (s1, 0, 2)), "a tensor's size first; the int input t dropped"
    x = torch.zeros(1, 5, 7)
    assert narrowed.sizes([x, None, 5, 123]) == {s0: 5, s1: 7}
    assert narrowed.key([x, None, 5, 999]) == (5, 7), "a value that is no size never changes the key"


def test_shapes_compare_without_evaluating_sizes():
    assert same_shape((2, s0, 16), (2, s0, 16)) and not same_shape((2, s0), (2, s1))
    assert shape_exprs((2, 3)) == (2, 3)


def _dynamic_graph():
    def f(x, n):
        y = x.reshape(x.size(0), n, -1) * 2.0
        return y.sum(1) + x.size(1)

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(f, backend=capture, dynamic=True, fullgraph=True)
    compiled(torch.randn(2, 12), 3)
    return graphs[0]


def test_specialize_makes_sizes_literals_and_leaves_the_input_graph_alone():
    gm = _dynamic_graph()
    before = gm.code
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    x = torch.randn(4, 20)  # a call at other sizes than the trace
    dims = {}
    for node in placeholders:
        value = node.meta["example_value"]
        if isinstance(value, torch.Tensor):
            dims.update({s.node.expr: x.shape[d] for d, s in enumerate(value.shape) if isinstance(s, torch.SymInt)})
    args = []
    for node in placeholders:
        value = node.meta["example_value"]
        args.append(x if isinstance(value, torch.Tensor) else dims.get(value.node.expr, 5))
    static = specialize_graph(gm, args)
    assert gm.code == before, "the input graph is never mutated"
    for node in static.graph.nodes:
        meta = tensor_meta(node)
        if meta is not None:
            assert all(isinstance(s, int) for s in meta.shape), node.format_node()
    sizes = [n for n in static.graph.find_nodes(op="placeholder") if not isinstance(n.meta["example_value"], torch.Tensor)]
    assert sizes and all(not n.users for n in sizes), "size inputs stay inputs, read by nothing"
    torch.testing.assert_close(static(*args), gm(*args))


def test_the_timestep_is_the_tensor_not_its_size():
    """A dynamic graph's batch symbol is read off the timestep (``L['timestep'].size()[0]``)
    and placed before it: its name says "timestep" too.  Taken for the timestep, every step
    reads the batch size (2.0) and forecasts along a flat time axis."""
    from specdiff_fx.passes import find_graph_inputs

    def denoiser(hidden_states, timestep):
        angles = timestep.float()[:, None] * torch.arange(4.0)
        return hidden_states * torch.sin(angles).sum(-1)[:, None, None]

    graphs = []
    compiled = torch.compile(denoiser, backend=lambda gm, _: graphs.append(gm) or gm.forward, dynamic=True)
    compiled(torch.randn(2, 6, 4), torch.tensor([500.0, 500.0]))
    placeholders = list(graphs[0].graph.find_nodes(op="placeholder"))
    sizes = [n for n in placeholders
             if "timestep" in n._dynamo_source.name and not isinstance(n.meta["example_value"], torch.Tensor)]
    assert sizes and placeholders.index(sizes[0]) < placeholders.index(
        next(n for n in placeholders if isinstance(n.meta["example_value"], torch.Tensor)))  # the trap is there
    inputs = find_graph_inputs(graphs[0])
    assert isinstance(placeholders[inputs.timestep_index].meta["example_value"], torch.Tensor)
    assert placeholders[inputs.timestep_index]._dynamo_source.name == "L['timestep']"


def test_a_size_no_node_uses_is_not_a_user_input():
    """``t = scheduler.timesteps[i]`` is a view at offset i: a dynamic trace that starts past
    step 0 (img2img) lifts its storage offset as an input, another value each step.  Read as a
    user input, it would change the call's signature every step (caches dropped, nothing cached)."""
    from specdiff_fx.passes import find_graph_inputs

    def denoiser(hidden_states, timestep):
        return hidden_states * torch.sin(timestep.float()[:, None, None] * torch.arange(4.0)).sum()

    graphs = []
    # as compile_in_place traces a dynamic compile: every size marked dynamic
    compiled = torch.compile(denoiser, backend=lambda gm, _: graphs.append(gm) or gm.forward, dynamic=None)
    x, t = torch.randn(2, 6, 4), torch.linspace(1000.0, 0.0, 8)[3].expand(2)
    torch._dynamo.maybe_mark_dynamic(x, [0, 1, 2])
    torch._dynamo.maybe_mark_dynamic(t, [0])
    compiled(x, t)
    placeholders = list(graphs[0].graph.find_nodes(op="placeholder"))
    offsets = [i for i, n in enumerate(placeholders) if "storage_offset" in n._dynamo_source.name]
    assert offsets and not placeholders[offsets[0]].users  # the trap is there
    inputs = find_graph_inputs(graphs[0])
    assert offsets[0] not in inputs.user_indices
    assert placeholders[inputs.timestep_index]._dynamo_source.name == "L['timestep']"


def test_size_ints_are_arguments_and_tuple_items_not_list_items():
    """compile_in_place makes a call's size ints symbolic from the first call: ints of their own
    and ints in tuples (Qwen-Image's ``img_shapes``), never a list of indices (SD3's
    ``skip_layers``, which dynamo 2.13 would test for membership wrongly)."""
    import re

    from specdiff_fx.backend import size_int_sources

    x = torch.randn(1)
    patterns = size_int_sources((x, 7), dict(img_shapes=[[(1, 4, 6)]], skip_layers=[0, 3], num_frames=5,
                                             attention_kwargs={"scale": 0.5, "grid": (2, 2)}, flag=True),
                                parameters=["hidden_states", "height"])

    def dynamic(name):
        return any(re.match(p, name) for p in patterns)

    for name in ("L['kwargs']['img_shapes'][0][0][1]", "L['img_shapes'][0][0][2]", "L['num_frames']",
                 "L['kwargs']['num_frames']", "L['height']", "L['args'][1]", "L['attention_kwargs']['grid'][1]"):
        assert dynamic(name), name
    for name in ("L['skip_layers'][0]", "L['kwargs']['skip_layers'][1]", "L['flag']", "L['hidden_states']",
                 "L['kwargs']['img_shapes'][0][0][1].x", "L['attention_kwargs']['scale']"):
        assert not dynamic(name), name
