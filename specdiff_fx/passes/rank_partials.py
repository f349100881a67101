"""All-reducing rank-local partials: a pure rewrite, GraphModule -> GraphModule.

Why this pass exists.  Under context parallelism each rank holds a shard of the tokens, so a
value summed over tokens inside the graph (the forecast probe's error sums,
passes/forecast_variants.py) is only this rank's part.  A decision made from it (refresh the
next step or not) would differ between ranks, and a rank that refreshed alone would run
collectives the others do not (a hang).  A pass that computes such a value tags it
``meta[RANK_PARTIAL]``; :func:`reduce_rank_partials` inserts its all-reduce over the group
the output is gathered over (:func:`.collectives.output_group`), so every rank reads the same
value.  Structural, hence the same collectives in the same order on every rank.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from .graph_copy import copy_graph_module, recompile

log = logging.getLogger(__name__)

RANK_PARTIAL = "specdiff_rank_partial"
"""``node.meta[RANK_PARTIAL] = "sum"`` marks a value that is a partial over this rank's tokens
(a sum over the local shard).  Under context parallelism :func:`reduce_rank_partials` replaces
it by its all-reduce, so a decision made from it is the same on every rank."""
RANK_REDUCE_TAG = "rank_reduce"
CACHING_LEVELS = {RANK_REDUCE_TAG: "ranks"}
"""Not a caching level: the all-reduces this pass adds (passes/tags.py)."""


def reduce_rank_partials(gm: fx.GraphModule, group_name: Any) -> fx.GraphModule:
    """A copy of ``gm`` where every node tagged ``meta[RANK_PARTIAL]`` is all-reduced over
    ``group_name`` (one ``all_reduce`` + ``wait_tensor`` each) before anything reads it.

    Structural, so every rank inserts the same collectives in the same order.  ``gm`` is not
    modified (the copy's nodes lose the tag, so a second application adds nothing); a graph
    without tagged nodes comes back as an unchanged copy.
    """
    out = copy_graph_module(gm)
    tagged = [n for n in out.graph.nodes if n.meta.get(RANK_PARTIAL)]
    for node in tagged:
        op = node.meta.pop(RANK_PARTIAL)  # reduced once: applying this twice changes nothing
        users = list(node.users)
        with out.graph.inserting_after(node):
            reduced = out.graph.call_function(torch.ops._c10d_functional.all_reduce.default,
                                              (node, op, group_name))
        with out.graph.inserting_after(reduced):
            waited = out.graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))
        for new in (reduced, waited):
            new.meta["specdiff"] = RANK_REDUCE_TAG
            for key in ("example_value", "val", "nn_module_stack"):
                if key in node.meta:
                    new.meta[key] = node.meta[key]
        for user in users:
            user.replace_input_with(node, waited)
    if tagged:
        log.info("all-reduce of %d rank-local partial(s) over group %r", len(tagged), group_name)
    return recompile(out)


def has_rank_partials(gm: fx.GraphModule) -> bool:
    return any(n.meta.get(RANK_PARTIAL) for n in gm.graph.nodes)
