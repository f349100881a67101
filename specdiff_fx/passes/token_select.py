"""Token selection inside the partial variant: scores, top-k and the C1/C2 classes as graph ops.

Why: the partial step's choice of tokens is a handful of small tensor ops (normalise, product,
``exp``, ``topk``, a sort and a cumulative sum).  Run from the runtime between compiled calls
they cost a kernel launch each and Python per step; inside the variant Inductor fuses them with
the gather that follows, and a step is one compiled call fed from device buffers.

``select_tokens_in_graph(partial, specs, k, c2_share, lam)`` returns a new module (the input
is not touched) that:

* takes three more runtime-owned inputs: ``specdiff_his`` (importance at the last full step),
  ``specdiff_fut`` (the draft's importance at the next draft timestep; ones without a draft)
  and ``specdiff_count`` (steps since each token was computed);
* computes ``(index, reuse_mask)`` with ``token_ops.select_tokens`` and feeds every former
  reader of the ``index`` / ``reuse_mask`` inputs from it;
* writes the choice back into those two inputs and the updated counts into ``specdiff_count``
  (in place), so the runtime can report classes and re-base forecasts without choosing.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..buffers import BufferRole, BufferSpec
from . import token_ops
from .graph_copy import add_static_input, copy_graph_module, find_node, recompile, tag_inserted

HIS, FUT, COUNT = BufferRole.HIS, BufferRole.FUT, BufferRole.COUNT
TAG_SELECT = "token_select"
TAG_INPUT = "token_cache_input"
CACHING_LEVELS = dict.fromkeys((TAG_SELECT, TAG_INPUT), "token")
"""The caching level of each tag this pass writes (passes/tags.py)."""


class TokenSelectError(ValueError):
    """The partial variant does not have the inputs selection feeds."""


def select_tokens_in_graph(partial: fx.GraphModule, specs: list[BufferSpec], k: int, c2_share: float,
                           lam: float) -> tuple[fx.GraphModule, list[BufferSpec]]:
    by_role = {s.role: s for s in specs}
    if BufferRole.INDEX not in by_role or BufferRole.REUSE_MASK not in by_role:
        raise TokenSelectError("the partial variant has no index / reuse_mask inputs to feed")
    index_spec, mask_spec = by_role[BufferRole.INDEX], by_role[BufferRole.REUSE_MASK]
    if index_spec.shape[1] != k:
        raise TokenSelectError(f"subset size {k} differs from the partial variant's ({index_spec.shape[1]})")
    out = copy_graph_module(partial)
    shape, device = mask_spec.shape, mask_spec.device
    new_specs = [BufferSpec("specdiff_his", HIS, shape, torch.float32, device),
                 BufferSpec("specdiff_fut", FUT, shape, torch.float32, device),
                 BufferSpec("specdiff_count", COUNT, shape, torch.long, device)]
    his, fut, count = (add_static_input(out, s.name, kind=TAG_INPUT) for s in new_specs)
    index_in, mask_in = find_node(out, index_spec.name), find_node(out, mask_spec.name)
    # the new inputs go just before ``index`` (input order = placeholder order = spec order), and the
    # selection before the first reader of ``index`` / ``reuse_mask``
    for node in (his, fut, count):
        index_in.prepend(node)
    readers = {n: list(n.users) for n in (index_in, mask_in)}
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    first_reader = min((u for users in readers.values() for u in users), key=order.__getitem__)
    g = out.graph
    with g.inserting_before(first_reader):
        chosen = tag_inserted(g.call_function(token_ops.select_tokens, (his, fut, count, k, c2_share, lam)),
                              TAG_SELECT, index_in)
        index = tag_inserted(g.call_function(operator.getitem, (chosen, 0)), TAG_SELECT, index_in)
        mask = tag_inserted(g.call_function(operator.getitem, (chosen, 1)), TAG_SELECT, mask_in)
        counted = tag_inserted(g.call_function(token_ops.update_cached_count, (count, index)), TAG_SELECT, index_in)
    with g.inserting_before(first_reader):
        for buf, value in ((index_in, index), (mask_in, mask), (count, counted)):
            tag_inserted(g.call_method("copy_", (buf, value)), TAG_SELECT, index_in, writes=True)
    for placeholder, value in ((index_in, index), (mask_in, mask)):
        for user in readers[placeholder]:
            user.replace_input_with(placeholder, value)
    at = specs.index(index_spec)
    return recompile(out), list(specs[:at]) + new_specs + list(specs[at:])
