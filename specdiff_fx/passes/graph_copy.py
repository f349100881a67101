"""Copy a dynamo GraphModule so rewrites never touch the graph dynamo still owns.

Dynamo re-reads its own graph's placeholders after the backend returns, so every
variant is built on a fresh copy.  Node names, ``meta`` and each placeholder's
``_dynamo_source`` survive the copy: names keep diffs readable, and AOTAutograd uses the
sources (with ``_param_name_to_source``) to mark parameters static for CUDA graphs.
"""

from __future__ import annotations

import copy

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


def eliminate_dead_code_keeping_writes(gm: fx.GraphModule) -> None:
    """Dead-code elimination that keeps the in-place cache writes a rewrite inserted
    (``tag_inserted(..., writes=True)``): their results are unused, their effect is the point."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or n.meta.get("specdiff_writes", False))
