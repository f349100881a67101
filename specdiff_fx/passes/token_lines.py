"""Token-level forecasting inside the graph: each token's residual and each K/V cache entry is a
line through its last two computed values (``c3="forecast"``, ``kv_forecast``).

A line is ``value + (x − stamp) · slope``: ``value`` the last computed value, ``slope`` its first
divided difference, ``stamp`` (one per token) the position ``x`` where the token was last
computed.  A full step computes every token: every line is re-based.  A partial step computes
the tokens at ``index`` (and every text token): the others read their line's value at ``x``,
and only the computed ones start a new line, over their own distance.

* Token residuals (``c3="forecast"``): the line is each token's residual over the blocks,
  ``exit − entry`` (the entry, patch embedding of this step's latents, is exact every step).
  The record variant re-bases every token; the partial variant composes uncomputed tokens as
  ``entry + line`` and re-bases the computed ones; the forecast variant (no token computed)
  exits ``entry + line`` for every token.
* K/V entries (``kv_forecast``): the cache holds each entry's last computed value; the
  partial variant's attention reads every entry's line (at most ``horizon`` steps out) with the
  fresh entries in place; only the fresh entries are written.

Why in the graph: the same arithmetic ran as eager ops between compiled calls, a dozen passes
over the K/V caches per partial step (0.23 of a plain step on the reference model, more than the
step's own compute).  As graph ops Inductor fuses it into the variants, and writes touch only
the entries a step computes.

Buffers (new modules; the inputs are untouched): ``specdiff_line`` = ``[x, valid, horizon]``
(float32, shared, written by the runtime before each call; ``valid`` is 0 on a trajectory's
first full step, whose caches hold nothing of it), and per line its slope and stamp (and, for
token residuals, its value), with the same names in every variant that takes them, so the
runtime hands each the same tensors.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..buffers import BufferRole, BufferSpec
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

LINE_INPUT = "specdiff_line"
TOKEN_LINE = "specdiff_token"
TAG_LINE = "token_line"
TAG_INPUT = "token_cache_input"
CACHING_LEVELS = dict.fromkeys((TAG_LINE, TAG_INPUT), "token")
"""The caching level of each tag this pass writes (passes/tags.py)."""


class TokenLineError(ValueError):
    """The variants do not have the structure this rewrite expects."""


# ----------------------------------------------------------------------------- graph ops
def _stamp_view(stamp: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """``stamp`` (batch, tokens) shaped to broadcast against a tensor with tokens at ``axis``."""
    shape = [1] * like.dim()
    shape[0], shape[axis] = stamp.shape[0], stamp.shape[1]
    return stamp.reshape(shape)


def record_line(value: torch.Tensor, slope: torch.Tensor, stamp: torch.Tensor, line: torch.Tensor,
                fresh: torch.Tensor, axis: int) -> torch.Tensor:
    """Full step, every entry computed: ``slope = valid · (fresh − value) / (x − stamp)`` over each
    token's own distance, then ``value = fresh`` and every stamp ``x``."""
    x, valid = line[0], line[1]
    dist = _stamp_view((x - stamp).clamp_min(1e-6), value, axis).to(value.dtype)
    fresh = fresh.to(value.dtype)
    slope.copy_((fresh - value) / dist * valid.to(value.dtype))
    value.copy_(fresh)
    stamp.copy_(x.expand(stamp.shape))
    return value


def extrapolate(value: torch.Tensor, slope: torch.Tensor, stamp: torch.Tensor, line: torch.Tensor, axis: int,
                horizon: bool = False) -> torch.Tensor:
    """Every entry's line at ``x`` (``horizon``: at most ``line[2]`` steps out)."""
    ahead = line[0] - stamp
    if horizon:
        ahead = ahead.clamp_max(line[2])
    return value + _stamp_view(ahead, value, axis).to(value.dtype) * slope


def forecast_line(value: torch.Tensor, slope: torch.Tensor, stamp: torch.Tensor, line: torch.Tensor,
                  fresh: torch.Tensor, positions: torch.Tensor, axis: int, horizon: bool = False) -> torch.Tensor:
    """Partial step: every entry's line at ``x`` with the ``fresh`` entries at ``positions`` in
    place (what the step reads), and the fresh entries start a new line at ``x`` (only they are
    written)."""
    x = line[0]
    index = token_ops.entry_index(positions, axis, value)
    fresh = fresh.to(value.dtype)
    rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1)
    since = (x - stamp[rows, positions]).clamp_min(1e-6)           # (batch, count)
    shape = [1] * fresh.dim()
    shape[0], shape[axis] = positions.shape
    read = extrapolate(value, slope, stamp, line, axis, horizon).index_put(index, fresh)
    slope.index_put_(index, (fresh - value[index]) / since.reshape(shape).to(value.dtype))
    value.index_put_(index, fresh)
    stamp.index_put_((rows, positions), x.expand(positions.shape))
    return read


# ----------------------------------------------------------------------------- rewrites
class _Inputs:
    """The line buffers of one variant being rewritten: added once each, specs in order."""

    def __init__(self, gm: fx.GraphModule, device: torch.device) -> None:
        self.gm, self.device, self.specs = gm, device, []
        existing = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
        self.line = existing.get(LINE_INPUT) or self.add(LINE_INPUT, BufferRole.LINE, (3,), torch.float32)

    def add(self, name: str, role: BufferRole, shape, dtype) -> fx.Node:
        self.specs.append(BufferSpec(name, role, tuple(int(s) for s in shape), dtype, self.device))
        return add_static_input(self.gm, name, kind=TAG_INPUT)

    def slope_and_stamp(self, name: str, shape, dtype, axis: int) -> tuple[fx.Node, fx.Node]:
        return (self.add(f"{name}_slope", BufferRole.LINE_SLOPE, shape, dtype),
                self.add(f"{name}_stamp", BufferRole.LINE_STAMP, (shape[0], shape[axis]), torch.float32))


def _kv_caches(gm: fx.GraphModule, specs: list[BufferSpec]) -> dict[str, tuple[fx.Node, BufferSpec]]:
    by_name = {s.name: s for s in specs if s.role == BufferRole.KV}
    return {n.name: (n, by_name[n.name]) for n in gm.graph.find_nodes(op="placeholder") if n.name in by_name}


def add_kv_lines(record: tuple[fx.GraphModule, list[BufferSpec]],
                 partial: tuple[fx.GraphModule, list[BufferSpec]]) -> tuple[tuple, tuple]:
    """The record and partial variants (graph, specs) with K/V lines: each takes its old
    buffers followed by the line buffers."""
    part = copy_graph_module(partial[0])
    caches = _kv_caches(part, partial[1])
    completions = list(part.graph.find_nodes(op="call_function", target=token_ops.complete_kv))
    if not caches or len(completions) != len(caches):
        raise TokenLineError(f"expected one K/V completion per cache, found {len(completions)} for "
                             f"{len(caches)} caches")
    axes = {node.args[0].name: int(node.args[3]) for node in completions}
    inputs = _Inputs(part, next(iter(caches.values()))[1].device)
    lines = {name: inputs.slope_and_stamp(name, spec.shape, spec.dtype, axes[name]) for name, (_, spec) in caches.items()}
    for node in completions:
        cache, fresh, positions, axis = node.args
        slope, stamp = lines[cache.name]
        with part.graph.inserting_before(node):
            read = tag_inserted(part.graph.call_function(
                forecast_line, (cache, slope, stamp, inputs.line, fresh, positions, axis, True)), TAG_LINE, node)
        node.replace_all_uses_with(read)
        part.graph.erase_node(node)
    partial_specs = list(partial[1]) + inputs.specs

    rec = copy_graph_module(record[0])
    rcaches = _kv_caches(rec, record[1])
    if set(rcaches) != set(caches):
        raise TokenLineError(f"the record variant writes caches {sorted(rcaches)}, the partial variant reads "
                             f"{sorted(caches)}")
    rinputs = _Inputs(rec, inputs.device)
    rlines = {name: rinputs.slope_and_stamp(name, spec.shape, spec.dtype, axes[name]) for name, (_, spec) in rcaches.items()}
    writes = [n for n in rec.graph.find_nodes(op="call_method", target="copy_")
              if n.args[0] in {node for node, _ in rcaches.values()}]
    if len(writes) != len(rcaches):
        raise TokenLineError(f"expected one write per K/V cache in the record variant, found {len(writes)}")
    for node in writes:
        cache, fresh = node.args
        slope, stamp = rlines[cache.name]
        with rec.graph.inserting_before(node):
            tag_inserted(rec.graph.call_function(
                record_line, (cache, slope, stamp, rinputs.line, fresh, axes[cache.name])), TAG_LINE, node, writes=True)
        rec.graph.erase_node(node)
    record_specs = list(record[1]) + rinputs.specs
    return _finish(rec, record_specs), _finish(part, partial_specs)


def _finish(gm: fx.GraphModule, specs: list[BufferSpec]) -> tuple[fx.GraphModule, list[BufferSpec]]:
    eliminate_dead_code_keeping_writes(gm)
    return recompile(gm), specs


def _token_line(inputs: _Inputs, exit_meta) -> tuple[fx.Node, fx.Node, fx.Node]:
    value = inputs.add(f"{TOKEN_LINE}_value", BufferRole.LINE_VALUE, exit_meta.shape, exit_meta.dtype)
    slope, stamp = inputs.slope_and_stamp(TOKEN_LINE, exit_meta.shape, exit_meta.dtype, 1)
    return value, slope, stamp


def _meta(gm: fx.GraphModule, name: str):
    meta = tensor_meta(find_node(gm, name))
    if meta is None:
        raise TokenLineError(f"node {name!r} has no tensor metadata")
    return meta


def add_token_lines(region: TokenRegion, record: tuple[fx.GraphModule, list[BufferSpec]],
                    partial: tuple[fx.GraphModule, list[BufferSpec]],
                    forecast: tuple[fx.GraphModule, list[BufferSpec]] | None = None) -> tuple:
    """The record, partial and (if given) forecast variants (graph, specs) with each token's
    residual forecast on its line: ``(record, partial, forecast)``, forecast None if not given.
    The partial variant's composition must read uncomputed tokens from the newest history entry
    (``compose_tokens(fresh, index, hist0, ...)``), the forecast variant's exit from
    ``mix_history`` (passes/token_forecast.py)."""
    exit_meta = _meta(record[0], region.exit)

    # record: every token's residual re-bases its line
    rec = copy_graph_module(record[0])
    inputs = _Inputs(rec, exit_meta.device)
    value, slope, stamp = _token_line(inputs, exit_meta)
    exit_node, entry = find_node(rec, region.exit), find_node(rec, region.entry)
    with rec.graph.inserting_after(exit_node):
        residual = tag_inserted(rec.graph.call_function(torch.sub, (exit_node, entry)), TAG_LINE, exit_node)
    with rec.graph.inserting_after(residual):
        tag_inserted(rec.graph.call_function(record_line, (value, slope, stamp, inputs.line, residual, 1)),
                     TAG_LINE, exit_node, writes=True)
    out = [_finish(rec, list(record[1]) + inputs.specs)]

    # partial: uncomputed tokens read entry + line; computed ones re-base it
    part = copy_graph_module(partial[0])
    inputs = _Inputs(part, exit_meta.device)
    value, slope, stamp = _token_line(inputs, exit_meta)
    composes = list(part.graph.find_nodes(op="call_function", target=token_ops.compose_tokens))
    if len(composes) != 1:
        raise TokenLineError(f"expected one token composition in the partial variant, found {len(composes)}")
    compose = composes[0]
    fresh_exit, index = compose.args[0], compose.args[1]
    entry = find_node(part, region.entry)
    with part.graph.inserting_before(compose):
        entry_subset = tag_inserted(part.graph.call_function(token_ops.gather_tokens, (entry, index, 1)),
                                    TAG_LINE, compose)
        fresh = tag_inserted(part.graph.call_function(torch.sub, (fresh_exit, entry_subset)), TAG_LINE, compose)
        read = tag_inserted(part.graph.call_function(
            forecast_line, (value, slope, stamp, inputs.line, fresh, index, 1)), TAG_LINE, compose)
        base = tag_inserted(part.graph.call_function(torch.add, (entry, read)), TAG_LINE, compose)
    compose.update_arg(2, base)
    out.append(_finish(part, list(partial[1]) + inputs.specs))

    if forecast is None:
        return out[0], out[1], None
    # forecast: no token computed; the exit is entry + line for every token
    fc = copy_graph_module(forecast[0])
    inputs = _Inputs(fc, exit_meta.device)
    value, slope, stamp = _token_line(inputs, exit_meta)
    mixes = list(fc.graph.find_nodes(op="call_function", target=token_ops.mix_history))
    if len(mixes) != 1:
        raise TokenLineError(f"expected one history mix in the forecast variant, found {len(mixes)}")
    with fc.graph.inserting_before(mixes[0]):
        line = tag_inserted(fc.graph.call_function(extrapolate, (value, slope, stamp, inputs.line, 1)),
                            TAG_LINE, mixes[0])
    mixes[0].replace_all_uses_with(line)
    fc.graph.erase_node(mixes[0])
    out.append(_finish(fc, list(forecast[1]) + inputs.specs))
    return tuple(out)
