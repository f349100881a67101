"""Token-level *forecast* variant for SpecDiff: no token computed, every token extrapolated.

SpecDiff's partial step computes a subset C1 and composes the other tokens from the ring of
the last exit features (``history_0..2``, newest first) with the runtime's weights.  With
``c3="forecast"`` those weights extrapolate each token along its own line.  A partial step
costs about its compute share ((1 − cache ratio) of a full step); a step where *no* token
needs correcting can skip the blocks entirely:

* forecast: the token region's exit reads ``w0·h0 + w1·h1 + w2·h2`` (the same composition as
  C3 tokens of a partial step, for every token), writes it into the oldest ring entry like
  a partial step does, and the model's own exit (final norm, projection, unpatchify) runs
  on it.  Dead-code elimination drops every block: the step costs the embeddings, the exit
  and one fused elementwise pass.

The variant takes the partial variant's history and weight buffers (same names and roles),
so the runtime hands it the same ring.  Mixing full, partial and forecast steps in one
trajectory is the runtime schedule's choice (``runtime/schedule.py``).

Residual form (``residual=True``): the exit is ``entry + mix(ring)``.  What the policy forecasts
is each token's *residual* over the blocks, ``exit − entry``: the entry (patch embedding of the
current latents) is exact and cheap at every step, and only the blocks' contribution is
extrapolated — the same split that makes branch-level lite forecasting hold up.  With
``c3="forecast"`` :func:`specdiff_fx.passes.token_lines.add_token_lines` then replaces the mix by
each token's line.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..buffers import RING, RING_WRITE, BufferRole, BufferSpec
from . import token_ops
from .graph_copy import (
    add_static_input,
    copy_graph_module,
    eliminate_dead_code_keeping_writes,
    find_node,
    recompile,
    tag_inserted,
)
from .graph_queries import tensor_meta
from .token_axis import TokenRegion

HISTORY, MIX_WEIGHTS = BufferRole.HISTORY, BufferRole.MIX_WEIGHTS
TAG_FORECAST = "token_forecast"
TAG_INPUT = "token_cache_input"
CACHING_LEVELS = dict.fromkeys((TAG_FORECAST, TAG_INPUT), "token")
"""The caching level of each tag this pass writes (passes/tags.py)."""


def build_token_forecast_variant(gm: fx.GraphModule, region: TokenRegion,
                                 residual: bool = False) -> tuple[fx.GraphModule, list[BufferSpec]]:
    """Copy of ``gm`` whose token-region exit is the runtime-weighted mix of the history ring
    (``residual``: the entry features plus that mix)."""
    out = copy_graph_module(gm)
    exit_node = find_node(out, region.exit)
    meta = tensor_meta(exit_node)
    if meta is None:
        raise ValueError(f"token-region exit {region.exit!r} has no tensor metadata")
    specs: list[BufferSpec] = []

    def buffer(name: str, role: BufferRole, shape, dtype, ring: int | None = None) -> fx.Node:
        specs.append(BufferSpec(name, role, tuple(int(s) for s in shape), dtype, meta.device, ring=ring))
        return add_static_input(out, name, kind=TAG_INPUT)

    weights = buffer("specdiff_mix_weights", MIX_WEIGHTS, (3,), torch.float32)
    hist = [buffer(f"specdiff_history_{i}", HISTORY, meta.shape, meta.dtype, ring=i) for i in range(RING)]
    users = list(exit_node.users)
    with out.graph.inserting_before(exit_node.next):
        mixed = tag_inserted(out.graph.call_function(token_ops.mix_history, (hist[0], hist[1], hist[2], weights)),
                             TAG_FORECAST, exit_node)
        if residual:
            mixed = tag_inserted(out.graph.call_function(torch.add, (find_node(out, region.entry), mixed)),
                                 TAG_FORECAST, exit_node)
        tag_inserted(out.graph.call_method("copy_", (hist[RING_WRITE], mixed)), TAG_FORECAST, exit_node, writes=True)
    for user in users:
        user.replace_input_with(exit_node, mixed)
    eliminate_dead_code_keeping_writes(out)
    return recompile(out), specs
