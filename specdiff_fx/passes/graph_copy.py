"""Copy a dynamo GraphModule so rewrites never touch the graph dynamo still owns.

Dynamo re-reads its own graph's placeholders after the backend returns, so every
variant is built on a fresh copy.  Node names, ``meta`` and each placeholder's
``_dynamo_source`` survive the copy: names keep diffs readable, and AOTAutograd uses the
sources (with ``_param_name_to_source``) to mark parameters static for CUDA graphs.
"""

from __future__ import annotations

import copy
import operator
from typing import Callable, Iterable

import torch
import torch.fx as fx

_CARRIED_ATTRS = ("_param_name_to_source",)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A structurally identical GraphModule sharing ``gm``'s submodules and attributes."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, value_map)
    graph.output(output)
    for old, new in value_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    # graph_copy does not carry the output node's meta; keep it for tools that read it.
    old_out = next(iter(gm.graph.find_nodes(op="output")))
    new_out = next(iter(graph.find_nodes(op="output")))
    new_out.meta = copy.copy(old_out.meta)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new_gm = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new_gm.meta = copy.copy(getattr(gm, "meta", {}))
    for attr in _CARRIED_ATTRS:
        if hasattr(gm, attr):
            setattr(new_gm, attr, getattr(gm, attr))
    return new_gm


def add_static_input(gm: fx.GraphModule, name: str, *, kind: str) -> fx.Node:
    """Append a placeholder for a runtime-owned buffer after the existing inputs.

    The buffer is the same tensor on every call, so it is tagged as an unguarded static
    input: Inductor may then keep it in CUDA graphs instead of copying it each call.
    """
    existing = list(gm.graph.find_nodes(op="placeholder"))
    anchor = existing[-1] if existing else None
    ctx = gm.graph.inserting_after(anchor) if anchor is not None else gm.graph.inserting_before(None)
    with ctx:
        node = gm.graph.placeholder(name)
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    node.meta["specdiff"] = kind
    node._dynamo_source = None
    return node


def tag_inserted(node: fx.Node, kind: str, like: fx.Node, writes: bool = False) -> fx.Node:
    """Mark a node the rewrite inserted (``meta['specdiff']``) and give it the module stack
    of the node it belongs to, so reports and diffs place it in its block, not at the root.
    ``writes`` marks an in-place cache write that dead-code elimination must keep."""
    node.meta["specdiff"] = kind
    if writes:
        node.meta["specdiff_writes"] = True
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])
    return node


def find_node(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"node {name!r} not found in graph")


def recompile(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.lint()
    gm.recompile()
    return gm


# ------------------------------------------------------------------------------- liveness
# Ops whose result is a view of (aliases) their first argument.  Conservative: an op that
# only sometimes aliases (``reshape``, ``contiguous``, ``to``) counts, which can keep a write
# that was not needed but never drops one that was.
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "expand", "expand_as", "transpose", "permute", "t",
    "unsqueeze", "squeeze", "flatten", "unflatten", "narrow", "select", "diagonal", "as_strided",
    "unfold", "chunk", "split", "tensor_split", "unbind", "movedim", "moveaxis", "swapaxes",
    "swapdims", "detach", "contiguous", "to", "type", "float", "half", "bfloat16", "real", "imag",
    "__getitem__",
})
_VIEW_FUNCTIONS = frozenset({
    operator.getitem, torch.reshape, torch.flatten, torch.unflatten, torch.transpose, torch.permute,
    torch.t, torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.diagonal,
    torch.as_strided, torch.chunk, torch.split, torch.tensor_split, torch.unbind, torch.movedim,
    torch.moveaxis, torch.swapaxes, torch.swapdims, torch.detach, torch.view_as_real,
    torch.view_as_complex, torch.real, torch.imag,
})


def _schema(node: fx.Node):
    return getattr(node.target, "_schema", None) if node.op == "call_function" else None


def written_tensor(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place op writes into (``x.copy_(y)``, ``x[i] = y``, ``out=x``), else None."""
    if node.op not in ("call_method", "call_function"):
        return None
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    schema = _schema(node)
    if schema is not None:  # an OpOverload: its schema says which argument it writes
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node):
                return value
        return None
    if node.op == "call_function" and node.target is operator.setitem:
        return first
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "") or ""
    if isinstance(name, str) and name.endswith("_") and not name.endswith("__"):
        return first
    if node.kwargs.get("inplace") is True:  # F.relu(x, inplace=True)
        return first
    return None


def _aliased_input(node: fx.Node) -> fx.Node | None:
    """The tensor ``node``'s result aliases: a view's input, or what an in-place op wrote."""
    written = written_tensor(node)
    if written is not None:
        return written
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    schema = _schema(node)
    if schema is not None:
        returns = schema.returns
        alias = returns[0].alias_info if returns else None
        return node.args[0] if alias is not None and not alias.is_write else None
    if (node.op == "call_method" and node.target in _VIEW_METHODS) or \
            (node.op == "call_function" and node.target in _VIEW_FUNCTIONS):
        return node.args[0]
    return None


def live_nodes_keeping_writes(graph: fx.Graph, is_root: Callable[[fx.Node], bool],
                              also: Callable[[fx.Node], Iterable[fx.Node]] = lambda n: ()) -> set[fx.Node]:
    """Nodes a graph needs: the roots and their inputs, plus every in-place write into a tensor
    that is still read.

    fx counts ``x.copy_(y)`` as pure, and its result is usually unused, so plain dead-code
    elimination drops it even when ``x`` is read afterwards (diffusers builds its gathered
    attention mask that way under context parallelism: ``t = empty_like(m); t.copy_(part)``,
    then ``cat([t, ...])``).  Here a write is live when its target, or the base of the view
    chain it writes through, or any view of that base, is live (a graph input or module
    attribute always is: a write into one is seen by the caller).  A write into a tensor
    nothing reads stays dead.  ``also(node)`` names nodes that must live whenever ``node``
    does (a collective's waits).
    """
    nodes = list(graph.nodes)
    base: dict[fx.Node, fx.Node] = {}
    for node in nodes:  # topological order: an input's base is known before its users'
        src = _aliased_input(node)
        base[node] = base.get(src, src) if src is not None else node
    group: dict[fx.Node, list[fx.Node]] = {}
    for node in nodes:
        group.setdefault(base[node], []).append(node)
    writes = [(n, base[t]) for n in nodes if (t := written_tensor(n)) is not None]

    live: set[fx.Node] = set()

    def visit(stack: list[fx.Node]) -> None:
        while stack:
            node = stack.pop()
            if node in live:
                continue
            live.add(node)
            stack.extend(node.all_input_nodes)
            stack.extend(also(node))

    visit([n for n in nodes if is_root(n)])
    pending = [(w, b) for w, b in writes if w not in live]
    changed = True
    while changed and pending:
        changed = False
        for write, root in list(pending):
            if write in live:
                pending.remove((write, root))
                continue
            if root.op in ("placeholder", "get_attr") or any(n in live for n in group[root] if n is not write):
                visit([write])
                pending.remove((write, root))
                changed = True
    return live


def eliminate_dead_code_keeping_writes(gm: fx.GraphModule) -> None:
    """Dead-code elimination that keeps the in-place cache writes a rewrite inserted
    (``tag_inserted(..., writes=True)``): their results are unused, their effect is the point.
    It also keeps the graph's own in-place writes into tensors that are still read
    (see :func:`live_nodes_keeping_writes`)."""
    live = live_nodes_keeping_writes(
        gm.graph, lambda n: n.is_impure() or bool(n.meta.get("specdiff_writes", False)))
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n in live)
