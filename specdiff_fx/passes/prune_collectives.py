"""Dropping the collectives nobody reads: a pure rewrite, GraphModule -> GraphModule.

Why this pass exists.  Each functional collective of a context-parallel graph is followed by a
``wait_tensor``, which is *impure* (it waits on an asynchronous handle), so
``Graph.eliminate_dead_code`` never drops it -- and with it everything upstream stays alive
too.  A reuse variant that reads its branch outputs from caches therefore still projects
q/k/v and still pays the whole all-to-all traffic of the branches it no longer computes.
:func:`prune_dead_collectives` removes exactly the collectives (with their waits and the pure
nodes that only fed them) whose results reach nothing the graph still needs.

Why it is safe on every rank.  A collective only completes if every rank of its group
issues it.  The decision here is purely structural -- it looks at graph edges, never
at tensor values, rank ids or timing -- and every rank traces the same program into the
same graph, so every rank removes the same collectives, in the same order.  Collectives
that mutate their input (``*_`` in-place forms) or whose outputs reach the graph output
or a side effect (a cache write) are kept.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch.fx as fx

from .collectives import COLLECTIVE_OPS, collective_op, is_collective, is_wait, waits_of
from .graph_copy import copy_graph_module, live_nodes_keeping_writes, recompile

log = logging.getLogger(__name__)


def _is_root(node: fx.Node) -> bool:
    """A node that must stay regardless of its users: outputs, inputs, side effects.

    An in-place write is no root by itself: it lives when the tensor it writes is read
    (or is a graph input), see :func:`~.graph_copy.live_nodes_keeping_writes`.  Counting every
    write as a root would keep diffusers' gathered-mask copies, and with them the mask
    all-gathers, in a variant whose attention is gone.
    """
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    op = collective_op(node)
    if op is not None:
        return COLLECTIVE_OPS[op].inplace
    if is_wait(node):
        return False  # kept iff its collective is kept (see waits_of)
    return node.is_impure() or bool(node.meta.get("specdiff_writes"))


def live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes the graph needs: the roots, their inputs, every in-place write into a tensor
    that is still read, and every wait of a live collective."""
    return live_nodes_keeping_writes(
        gm.graph, _is_root,
        also=lambda n: waits_of(n) if is_collective(n) else ())  # an issued collective is always waited on


def prune_dead_collectives(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` without the collectives (and their waits, and the pure nodes that
    only fed them) whose results reach neither the output nor a side effect.

    Purely structural, hence identical on every rank.  ``gm`` is not modified.
    """
    out = copy_graph_module(gm)
    live = live_nodes(out)
    dead = [n for n in out.graph.nodes if n not in live]
    removed = Counter(collective_op(n) for n in dead if is_collective(n))
    for node in reversed(dead):
        out.graph.erase_node(node)
    if removed:
        log.info("pruned %d dead collective(s) %s and %d other node(s)",
                 sum(removed.values()), dict(removed), len(dead) - 2 * sum(removed.values()))
    return recompile(out)
