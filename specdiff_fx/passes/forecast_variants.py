"""Branch-level forecasting (TaylorSeer-class): *record* and *forecast* graphs from one graph
(docs/forecasting.md).

Plain reuse (``branch_cache_variants``) feeds a cached step the branch value of the last
full step: ``g(t) ≈ g(t_last)``.  Flow-matching moves every token's input at every step,
so that error grows linearly with the distance to the last full step.  A forecast
extrapolates instead: with per-branch finite differences kept at full steps,

    g(t_last + k) ≈ F + k·D1 + k²/2·D2          (F = g(t_last); D1, D2 the differences)

which is first- (or second-) order accurate in k, so the error grows as k² (k³).

* record (full steps): the original computation, plus, per branch, in place
  ``D2 ← c1·(D1_new − D1)``, ``D1 ← D1_new = c0·(g − F)``, ``F ← g`` (all read before any
  write; order 2 only keeps D2).  ``c0 = 1/d`` and ``c1 = 2/(d + d_prev)`` are Newton's
  divided differences over the distances ``d`` between full steps; the runtime sets them
  to 0 where a difference has no history yet, which makes the forecast a plain reuse.
* forecast (cached steps): each branch's consumer (the gate mul or the residual add) reads
  ``F + a1·D1 (+ a2·D2)`` with ``a1 = k``, ``a2 = k²/2``; dead-code elimination drops the
  branch bodies; the gate is recomputed every step.

Every distance and coefficient is a runtime-owned tensor input (``specdiff_taylor_coef``:
``[c0, c1, a1, a2]``), never a Python constant: any schedule runs the same two compiled
graphs, with zero recompiles.

Optional probe: with ``probe_branches`` the forecast variant still *computes* those targets
(e.g. the first block's) and writes ``mean|g − forecast| / mean|g|`` over them into the
``specdiff_taylor_err`` input: a forecast-error estimate the runtime reads at the next
step to decide whether to refresh (the probed targets use their computed value).  A probed
target is a branch (``g``: its cached value) or, in lite mode, a :class:`ResidualChain`
(``g``: its residual ``output − source``); ``lite_targets(probe_first_block=True)`` gives the
first block a chain of its own for that.

Both variants take the original inputs followed by the same buffers in the same order.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..buffers import BufferRole, BufferSpec, shape_exprs, symbolic_example
from .rank_partials import RANK_PARTIAL
from .graph_copy import (
    add_static_input,
    copy_graph_module,
    eliminate_dead_code_keeping_writes,
    find_node,
    recompile,
    tag_inserted,
)
from .graph_queries import tensor_meta
from .residual_branches import ResidualBranch

FORECAST_RECORD_TAG = "forecast_record"
FORECAST_TAG = "forecast"
FORECAST_PROBE_TAG = "forecast_probe"
FORECAST_INPUT_TAG = "forecast_input"
CACHING_LEVELS = {**dict.fromkeys((FORECAST_RECORD_TAG, FORECAST_TAG, FORECAST_INPUT_TAG), "branch"),
                  FORECAST_PROBE_TAG: "probe"}
"""The caching level of each tag this pass writes (passes/tags.py): a forecast stands in for a
branch or, in lite mode, a chain of blocks; the probe is real compute kept to check it."""
TAYLOR_TERM = BufferRole.TAYLOR_TERM        # role of F, D1, D2 buffers
TAYLOR_COEF = BufferRole.TAYLOR_COEF        # role of the [c0, c1, a1, a2] coefficient buffer
FORECAST_ERROR = BufferRole.FORECAST_ERROR  # role of the probe's error estimate buffer
COEF_INPUT = "specdiff_taylor_coef"
ERROR_INPUT = "specdiff_taylor_err"
ORDERS = (1, 2)


@dataclass(frozen=True)
class ResidualChain:
    """A run of residual branches of one stream where each leaves the stream at the previous
    one's add: ``output = source + Σ branches``.  Lite forecasting caches ``output − source``
    once per chain instead of every branch."""

    name: str
    stream: str
    source: str                 # the stream value entering the first branch
    output: str                 # the last branch's residual add
    branches: tuple[str, ...]
    blocks: tuple[str, ...]


class ForecastError(ValueError):
    """The graph cannot be given forecast variants (names the branch and why)."""


def _term_specs(gm: fx.GraphModule, targets: list, order: int,
                cache_dtype: torch.dtype | None = None) -> list[BufferSpec]:
    """``order + 1`` term buffers per forecast target (a branch's cached value, a chain's output),
    in ``cache_dtype`` if given (read back through a cast to the target's dtype)."""
    specs = []
    for i, target in enumerate(targets):
        node_name = target.cached if isinstance(target, ResidualBranch) else target.output
        meta = tensor_meta(find_node(gm, node_name))
        if meta is None:
            raise ForecastError(f"{target.name}: value {node_name!r} has no tensor metadata")
        if not meta.dtype.is_floating_point:
            raise ForecastError(f"{target.name}: value {node_name!r} is {meta.dtype}, not floating point")
        for j in range(order + 1):
            specs.append(BufferSpec(
                name=f"specdiff_taylor_{i}_{j}", role=TAYLOR_TERM, branch=target.name,
                shape=shape_exprs(meta.shape), example_shape=symbolic_example(meta.shape),
                dtype=cache_dtype or meta.dtype, device=meta.device,
            ))
    return specs


def forecast_input_specs(gm: fx.GraphModule, branches: list, order: int = 1,
                         cache_dtype: torch.dtype | None = None) -> list[BufferSpec]:
    """The extra inputs both variants take: per target (branch or chain) ``order + 1`` terms,
    then the coefficients, then the error estimate."""
    if order not in ORDERS:
        raise ForecastError(f"forecast order must be one of {ORDERS}, got {order!r}")
    if not branches:
        raise ForecastError("no residual branches to forecast")
    specs = _term_specs(gm, branches, order, cache_dtype)
    device = specs[0].device
    specs.append(BufferSpec(COEF_INPUT, TAYLOR_COEF, (4,), torch.float32, device))
    specs.append(BufferSpec(ERROR_INPUT, FORECAST_ERROR, (1,), torch.float32, device))
    return specs


_HELD_DTYPE = "specdiff_held_dtype"  # node meta: the dtype a term input is held in


def _copy_with_inputs(gm, branches, order, cache_dtype=None):
    """The copy, its specs, per target its term inputs, the coefficients and the error input.
    Reads of a term go through ``_read`` (a cast back when the terms are held narrower)."""
    specs = forecast_input_specs(gm, branches, order, cache_dtype)
    out = copy_graph_module(gm)
    nodes = [add_static_input(out, s.name, kind=FORECAST_INPUT_TAG) for s in specs]
    for node, spec in zip(nodes, specs):
        node.meta[_HELD_DTYPE] = spec.dtype
    terms = [nodes[i * (order + 1):(i + 1) * (order + 1)] for i in range(len(branches))]
    return out, specs, terms, nodes[-2], nodes[-1]



def _read(graph: fx.Graph, term: fx.Node, dtype: torch.dtype, like: fx.Node, tag: str) -> fx.Node:
    """``term`` as ``dtype``: itself, or a cast when the term is held in another dtype."""
    if term.meta.get(_HELD_DTYPE, dtype) == dtype:
        return term
    return tag_inserted(graph.call_method("to", (term, dtype)), tag, like)


def _call(graph: fx.Graph, fn, args, like: fx.Node, tag: str) -> fx.Node:
    return tag_inserted(graph.call_function(fn, args), tag, like)


def build_forecast_record_variant(
    gm: fx.GraphModule, branches: list, order: int = 1, cache_dtype: torch.dtype | None = None
) -> tuple[fx.GraphModule, list[BufferSpec]]:
    """Copy of ``gm`` that also updates every target's Taylor terms in place (a branch: its
    cached value; a :class:`ResidualChain`: its residual ``output − source``)."""
    out, specs, terms, coef, _ = _copy_with_inputs(gm, branches, order, cache_dtype)
    g_ = out.graph
    for target, term in zip(branches, terms):
        if isinstance(target, ResidualChain):
            last = find_node(out, target.output)
            with g_.inserting_before(last.next):
                value = _call(g_, operator.sub, (last, find_node(out, target.source)), last, FORECAST_RECORD_TAG)
            _insert_record(g_, value, term, coef, last, order)
        else:
            _insert_record(g_, find_node(out, target.cached), term, coef, find_node(out, target.add), order)
    return recompile(out), specs


def _insert_record(g_: fx.Graph, value: fx.Node, terms: list[fx.Node], coef: fx.Node, like: fx.Node,
                   order: int) -> None:
    """After ``value``: D2 ← c1·(D1_new − D1), D1 ← D1_new = c0·(value − F), F ← value."""
    f_prev, *diffs = terms
    # inserting_before(next) keeps consecutive inserts in program order
    with g_.inserting_before(value.next):
        g = tag_inserted(g_.call_method("detach", (value,)), FORECAST_RECORD_TAG, like)
        meta = tensor_meta(value)
        dtype = (meta if meta is not None else tensor_meta(like)).dtype
        c0 = _call(g_, operator.getitem, (coef, 0), like, FORECAST_RECORD_TAG)
        delta = _call(g_, operator.sub, (g, _read(g_, f_prev, dtype, like, FORECAST_RECORD_TAG)), like,
                      FORECAST_RECORD_TAG)
        d1_new = _call(g_, operator.mul, (delta, c0), like, FORECAST_RECORD_TAG)
        writes = []
        if order == 2:
            c1 = _call(g_, operator.getitem, (coef, 1), like, FORECAST_RECORD_TAG)
            step = _call(g_, operator.sub, (d1_new, _read(g_, diffs[0], dtype, like, FORECAST_RECORD_TAG)), like,
                         FORECAST_RECORD_TAG)
            writes.append((diffs[1], _call(g_, operator.mul, (step, c1), like, FORECAST_RECORD_TAG)))
        writes += [(diffs[0], d1_new), (f_prev, g)]
        for buf, new in writes:  # every read above happens before the first write
            tag_inserted(g_.call_method("copy_", (buf, new)), FORECAST_RECORD_TAG, like, writes=True)


def _forecast_value(graph: fx.Graph, f_prev, diffs, coef, like, dtype: torch.dtype) -> fx.Node:
    """``F + a1·D1 (+ a2·D2)`` in ``dtype``, inserted before ``like``."""
    with graph.inserting_before(like):
        value = _read(graph, f_prev, dtype, like, FORECAST_TAG)
        for j, diff in enumerate(diffs):
            a = _call(graph, operator.getitem, (coef, 2 + j), like, FORECAST_TAG)
            term = _call(graph, operator.mul, (_read(graph, diff, dtype, like, FORECAST_TAG), a), like, FORECAST_TAG)
            value = _call(graph, operator.add, (value, term), like, FORECAST_TAG)
    return value


def build_forecast_variant(
    gm: fx.GraphModule,
    branches: list,
    order: int = 1,
    probe_branches: tuple[str, ...] = (),
    cache_dtype: torch.dtype | None = None,
) -> tuple[fx.GraphModule, list[BufferSpec]]:
    """Copy of ``gm`` where every branch consumer reads its forecast (bodies dropped),
    except the ``probe_branches`` (target names), which are computed and measure the forecast
    error.  A :class:`ResidualChain` target's output becomes ``source + forecast``: whole blocks
    drop out, adaLN gates included; a probed chain keeps its computed output and compares its
    residual ``output − source`` with the forecast."""
    unknown = set(probe_branches) - {b.name for b in branches}
    if unknown:
        raise ForecastError(f"probe branches {sorted(unknown)} are not forecast targets of this graph")
    out, specs, terms, coef, err = _copy_with_inputs(gm, branches, order, cache_dtype)
    g_ = out.graph
    sums: list[tuple[fx.Node, fx.Node, fx.Node]] = []  # per probed target: sum|g - forecast|, sum|g|, where
    # A chain's output becomes ``source + forecast``.  A later chain that starts at it must read
    # that replacement, not the computed output, or the earlier chain's blocks stay alive.
    replaced: dict[fx.Node, fx.Node] = {}
    for br, (f_prev, *diffs) in zip(branches, terms):
        if isinstance(br, ResidualChain):
            last = find_node(out, br.output)
            source = find_node(out, br.source)
            source = replaced.get(source, source)
            forecast = _forecast_value(g_, f_prev, diffs, coef, last.next, tensor_meta(last).dtype)
            if br.name in probe_branches:  # computed: its real output stays, its residual is compared
                with g_.inserting_before(forecast.next):
                    residual = _call(g_, operator.sub, (last, source), last, FORECAST_PROBE_TAG)
                    sums.append(_probe_sums(g_, residual, forecast, last) + (last,))
                continue
            with g_.inserting_after(forecast):
                value = _call(g_, operator.add, (source, forecast), last, FORECAST_TAG)
            last.replace_all_uses_with(value)
            replaced[last] = value
            continue
        consumer = find_node(out, br.add if br.cached == br.output else br.output)
        value = find_node(out, br.cached)
        forecast = _forecast_value(g_, f_prev, diffs, coef, consumer, tensor_meta(value).dtype)
        if br.name not in probe_branches:
            consumer.replace_input_with(value, forecast)
            consumer.meta["specdiff"] = FORECAST_TAG
            continue
        with g_.inserting_before(consumer):  # probe: the consumer keeps the computed value
            sums.append(_probe_sums(g_, value, forecast, consumer) + (consumer,))
    if sums:
        # after the last of the per-target sums (targets are not in graph order across streams)
        position = {n: i for i, n in enumerate(g_.nodes)}
        anchor = max((n for d, r, _ in sums for n in (d, r)), key=position.__getitem__)
        like = sums[-1][2]
        with g_.inserting_before(anchor.next):
            num, den = sums[0][0], sums[0][1]
            for d, r, _ in sums[1:]:
                num = _call(g_, operator.add, (num, d), like, FORECAST_PROBE_TAG)
                den = _call(g_, operator.add, (den, r), like, FORECAST_PROBE_TAG)
            # sums over this rank's tokens: under context parallelism they are all-reduced first
            num.meta[RANK_PARTIAL] = den.meta[RANK_PARTIAL] = "sum"
            safe = _call(g_, torch.clamp_min, (den, 1e-12), like, FORECAST_PROBE_TAG)
            rel = _call(g_, operator.truediv, (num, safe), like, FORECAST_PROBE_TAG)
            tag_inserted(g_.call_method("copy_", (err, rel)), FORECAST_PROBE_TAG, like, writes=True)
    eliminate_dead_code_keeping_writes(out)
    return recompile(out), specs


def _probe_sums(g_: fx.Graph, value: fx.Node, forecast: fx.Node, like: fx.Node) -> tuple[fx.Node, fx.Node]:
    """``Σ|g − forecast|`` and ``Σ|g|`` in fp32 for a computed ``value`` g, at the insert point."""
    def probe(fn, *args, **kwargs):
        return tag_inserted(g_.call_function(fn, args, kwargs), FORECAST_PROBE_TAG, like)

    computed = tag_inserted(g_.call_method("detach", (value,)), FORECAST_PROBE_TAG, like)
    d = probe(torch.sum, probe(torch.abs, probe(torch.sub, computed, forecast)), dtype=torch.float32)
    r = probe(torch.sum, probe(torch.abs, computed), dtype=torch.float32)
    return d, r


# ----------------------------------------------------------------------------- lite: chains
def _chain_link(gm: fx.GraphModule, br: ResidualBranch) -> bool:
    """A branch can join a chain if its skip is the stream itself (source and add share a shape)."""
    src, add = tensor_meta(find_node(gm, br.source)), tensor_meta(find_node(gm, br.add))
    return src is not None and add is not None and tuple(src.shape) == tuple(add.shape)


def lite_targets(gm: fx.GraphModule, branches: list[ResidualBranch],
                 group_blocks: int | None = None, probe_first_block: bool = False) -> list:
    """Forecast targets of lite mode: chains of consecutive branches, cut every ``group_blocks``
    blocks (None: never); a branch whose skip changes shape (a ResNet's ``conv_shortcut``) stays
    a per-branch target.  ``probe_first_block``: every chain is also cut after the first block
    (the block of the first branch in graph order), so the probe can compute that block's chains
    and measure their forecast error (:func:`probe_targets`); the chains after it are counted
    from there.

    A branch continues the chain whose last residual add is its source: chains follow the
    dataflow, not the stream labels.  (Qwen-Image's text branches -- ``txt_norm1``, ``txt_mlp``
    -- carry no ``context`` in their module paths and are labelled image stream; keyed by label,
    its image and text branches alternated and every chain held one branch.)  A chain is named
    after its first branch's stream."""
    if group_blocks is not None and group_blocks < 1:
        raise ForecastError(f"group_blocks must be >= 1 or None, got {group_blocks!r}")
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    ordered = sorted(branches, key=lambda b: order[b.add])
    first = ordered[0].block if probe_first_block and ordered else None
    runs: list[list[ResidualBranch]] = []
    open_at: dict[str, list[ResidualBranch]] = {}  # open chains by their last residual add
    for br in ordered:
        if not _chain_link(gm, br):
            runs.append([br])
            continue
        current = open_at.pop(br.source, None)
        blocks = {b.block for b in current} if current else set()
        leaves_first = first in blocks and br.block != first
        if current and not leaves_first and (group_blocks is None or br.block in blocks
                                             or len(blocks) < group_blocks):
            current.append(br)
        else:
            current = [br]
            runs.append(current)
        open_at[br.add] = current
    targets: list = []
    for run in runs:
        if not _chain_link(gm, run[0]):
            targets.append(run[0])
            continue
        blocks = tuple(dict.fromkeys(b.block for b in run))
        targets.append(ResidualChain(f"chain{len(targets)}:{run[0].stream}:{blocks[0]}..{blocks[-1]}",
                                     run[0].stream, run[0].source, run[-1].add,
                                     tuple(b.name for b in run), blocks))
    return targets


def probe_targets(targets: list, block: str) -> tuple[str, ...]:
    """Names of the forecast targets lying wholly in ``block``: branches of it and chains of just
    it.  With ``block`` the first block, these are what the probe computes: per branch, every
    branch of that block; in lite mode (``lite_targets(probe_first_block=True)``) its chain in
    each stream it writes (in a joint MMDiT block the attention is one joint op over both
    streams, so the context stream's chain adds only its own feed-forward)."""
    names = []
    for t in targets:
        blocks = t.blocks if isinstance(t, ResidualChain) else (t.block,)
        if blocks == (block,):
            names.append(t.name)
    return tuple(names)
