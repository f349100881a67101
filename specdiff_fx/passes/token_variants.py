"""Token-level variants of one graph for SpecDiff: *full+record*, *partial* and *draft*.

* full+record: all tokens.  Writes every attention site's keys/values (image + text) into
  per-layer caches, the exit features into a history buffer, and the exact attention
  each image token receives (summed over self/joint attention sites) into an importance
  buffer.
* partial: a static-size subset of k image tokens per batch element (``index``) flows
  through the blocks; constants that depended on N are re-evaluated at k; RoPE tables
  are gathered; each attention site writes the fresh keys/values of the subset into its
  cache and attends over the whole cache; at the exit, computed tokens are composed with
  reused (C2) and history-mixed (C3) tokens, and the model's own exit runs on all tokens.
* draft: the full computation plus importance recording, and no cache writes, so a
  speculative draft trajectory never touches the main trajectory's caches.

All runtime-owned buffers are extra static inputs described by :class:`~specdiff_fx.buffers.BufferSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

from ..buffers import RING, RING_WRITE, BufferRole, BufferSpec
from . import token_ops
from .graph_copy import (
    add_static_input,
    copy_graph_module,
    eliminate_dead_code_keeping_writes,
    recompile,
    tag_inserted,
)
from .graph_queries import tensor_meta
from .token_axis import IMAGE, N, TokenAxis, TokenAxisError, TokenRegion

INDEX, REUSE_MASK, MIX_WEIGHTS = BufferRole.INDEX, BufferRole.REUSE_MASK, BufferRole.MIX_WEIGHTS
HISTORY, KV, IMPORTANCE = BufferRole.HISTORY, BufferRole.KV, BufferRole.IMPORTANCE

TAG_GATHER, TAG_SCATTER, TAG_KV, TAG_SCORE, TAG_CONST = (
    "token_gather", "token_compose", "kv_completion", "importance_score", "token_count")
TAG_WRITE, TAG_INPUT = "cache_write", "token_cache_input"
CACHING_LEVELS = dict.fromkeys((TAG_GATHER, TAG_SCATTER, TAG_KV, TAG_SCORE, TAG_CONST, TAG_WRITE, TAG_INPUT), "token")
"""The caching level of each tag this pass writes (passes/tags.py)."""


def _meta(node: fx.Node):
    meta = tensor_meta(node)
    if meta is None:
        raise TokenAxisError(f"{node.format_node()}: no tensor metadata")
    return meta


def _spec(gm: fx.GraphModule, name: str, role: BufferRole, shape, dtype, device,
          ring: int | None = None) -> tuple[BufferSpec, fx.Node]:
    node = add_static_input(gm, name, kind=TAG_INPUT)
    return BufferSpec(name, role, tuple(int(s) for s in shape), dtype, device, ring=ring), node


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    eliminate_dead_code_keeping_writes(gm)
    return recompile(gm)


def _image_segment(layout: TokenAxis, n: int) -> tuple[int, int]:
    offset = 0
    for kind, size in layout.segments:
        if kind == IMAGE:
            return offset, n
        offset += int(sympy.sympify(size).subs(N, n))
    raise TokenAxisError(f"attention keys with layout {layout.segments} have no image segment")


@dataclass(frozen=True)
class ImportanceSampling:
    """How the full+record and draft variants estimate the attention each image token receives.

    The exact sum (every query, every self/joint attention site) materialises a
    ``queries × keys`` map per head: at SD3-medium shape and 1024² that is 2.1× a plain step on
    an H200 (docs/scale.md), where fused SDPA never materialises it.  Three knobs bound it:

    * ``stride``: one query in every s (at least), jittered within its block of s
      (:func:`token_ops.query_sample`: no lattice to alias with the image grid); 1 is exact.
    * ``max_queries``: at most this many queries per site.  Where the stride would sample more,
      it grows to ``ceil(queries / max_queries)``.
    * ``max_sites``: score at most this many sites, spread evenly over the stack (the centres
      of ``max_sites`` equal groups), so early and late layers both contribute.
    """

    stride: int = 1
    max_queries: int | None = None
    max_sites: int | None = None

    def stride_for(self, queries: int) -> int:
        """The query stride at a site with ``queries`` queries."""
        stride = self.stride
        if self.max_queries is not None and -(-queries // stride) > self.max_queries:
            stride = -(-queries // self.max_queries)
        return stride

    def sites(self, count: int) -> list[int]:
        """Which of ``count`` scoring sites (in graph order) contribute."""
        if self.max_sites is None or self.max_sites >= count:
            return list(range(count))
        return sorted({int((i + 0.5) * count / self.max_sites) for i in range(self.max_sites)})


def _scoring_sites(region: TokenRegion) -> list:
    """Self/joint attention sites whose attention map scores the image tokens."""
    return [s for s in region.sites if s.key_layout is not None
            and s.query_layout.axis == 2 and s.key_layout.axis == 2]


def importance_plan(region: TokenRegion, sampling: ImportanceSampling) -> list[tuple[str, int]]:
    """``(sdpa node, query stride)`` of each site that contributes to the importance."""
    sites = _scoring_sites(region)
    return [(sites[i].node, sampling.stride_for(sites[i].query_layout.concrete(region.num_tokens)))
            for i in sampling.sites(len(sites))]


def _record_sites(out: fx.GraphModule, region: TokenRegion, write_kv: bool,
                  sampling: ImportanceSampling = ImportanceSampling()):
    """Insert K/V cache writes (optionally) and importance recording at attention sites."""
    nodes = {n.name: n for n in out.graph.nodes}
    plan = dict(importance_plan(region, sampling))
    specs, received = [], []
    for i, site in enumerate(s for s in region.sites if s.key_layout is not None):
        sdpa = nodes[site.node]
        key, value, query = nodes[site.key], nodes[site.value], nodes[site.query]
        if write_kv:
            for role_name, value_node in (("k", key), ("v", value)):
                meta = _meta(value_node)
                spec, cache = _spec(out, f"specdiff_{role_name}cache_{i}", KV, meta.shape, meta.dtype, meta.device)
                specs.append(spec)
                with out.graph.inserting_before(sdpa):
                    det = tag_inserted(out.graph.call_method("detach", (value_node,)), TAG_WRITE, sdpa)
                    tag_inserted(out.graph.call_method("copy_", (cache, det)), TAG_WRITE, sdpa, writes=True)
        if site.node in plan:
            offset, count = _image_segment(site.key_layout, region.num_tokens)
            with out.graph.inserting_before(sdpa):
                received.append(tag_inserted(out.graph.call_function(
                    token_ops.attention_received, (query, key, site.scale, offset, count, plan[site.node])),
                    TAG_SCORE, sdpa))
    return specs, received


def _record_importance(out: fx.GraphModule, region: TokenRegion, received: list[fx.Node]):
    if not received:
        raise TokenAxisError("no self/joint attention site whose attention map scores the image tokens "
                             f"(sites: {[s.node for s in region.sites]})")
    exit_node = next(n for n in out.graph.nodes if n.name == region.exit)
    batch = _meta(exit_node).shape[0]
    spec, buf = _spec(out, "specdiff_importance", IMPORTANCE, (batch, region.num_tokens), torch.float32,
                      _meta(exit_node).device)
    total, anchor = received[0], received[-1]
    for r in received[1:]:
        with out.graph.inserting_after(anchor):
            total = anchor = tag_inserted(out.graph.call_function(torch.add, (total, r)), TAG_SCORE, r)
    with out.graph.inserting_after(total):
        tag_inserted(out.graph.call_method("copy_", (buf, total)), TAG_SCORE, received[-1], writes=True)
    return spec


def build_token_record_variant(gm: fx.GraphModule, region: TokenRegion,
                               sampling: ImportanceSampling = ImportanceSampling()):
    """Full computation that refreshes K/V caches and history and records importance
    (exactly by default, or estimated as ``sampling`` says)."""
    out = copy_graph_module(gm)
    specs, received = _record_sites(out, region, write_kv=True, sampling=sampling)
    specs.append(_record_importance(out, region, received))
    exit_node = next(n for n in out.graph.nodes if n.name == region.exit)
    meta = _meta(exit_node)
    # it writes the oldest ring entry, which the runtime then rotates to the front
    spec, hist = _spec(out, "specdiff_history_out", HISTORY, meta.shape, meta.dtype, meta.device, ring=RING_WRITE)
    specs.append(spec)
    with out.graph.inserting_after(exit_node):
        det = tag_inserted(out.graph.call_method("detach", (exit_node,)), TAG_WRITE, exit_node)
    with out.graph.inserting_after(det):
        tag_inserted(out.graph.call_method("copy_", (hist, det)), TAG_WRITE, exit_node, writes=True)
    return _finish(out), specs


def build_token_draft_variant(gm: fx.GraphModule, region: TokenRegion,
                              sampling: ImportanceSampling = ImportanceSampling()):
    """Full computation that only records importance (no cache is touched)."""
    out = copy_graph_module(gm)
    _, received = _record_sites(out, region, write_kv=False, sampling=sampling)
    spec = _record_importance(out, region, received)
    return _finish(out), [spec]


def _instantiate(template: Any, k: int, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(template, fx.Node):
        return nodes[template.name]
    if isinstance(template, sympy.Basic):
        return int(template.subs(N, k))
    if isinstance(template, slice):
        return slice(*(_instantiate(x, k, nodes) for x in (template.start, template.stop, template.step)))
    if isinstance(template, (list, tuple)):
        items = [_instantiate(x, k, nodes) for x in template]
        return type(template)(items) if isinstance(template, tuple) else items
    if isinstance(template, dict):
        return {key: _instantiate(v, k, nodes) for key, v in template.items()}
    return template


def build_token_partial_variant(gm: fx.GraphModule, region: TokenRegion, k: int):
    """Partial computation over a static subset of ``k`` image tokens per batch element."""
    if not 2 <= k <= region.num_tokens:
        raise ValueError(f"subset size k={k} must be in [2, {region.num_tokens}]")
    out = copy_graph_module(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    entry, exit_node = nodes[region.entry], nodes[region.exit]
    in_region = {nodes[name] for name in region.region}
    meta_exit = _meta(exit_node)
    batch, device = int(meta_exit.shape[0]), meta_exit.device

    specs = []
    spec, index = _spec(out, "specdiff_index", INDEX, (batch, k), torch.long, device)
    specs.append(spec)
    spec, reuse_mask = _spec(out, "specdiff_reuse_mask", REUSE_MASK, (batch, region.num_tokens), torch.bool, device)
    specs.append(spec)
    spec, weights = _spec(out, "specdiff_mix_weights", MIX_WEIGHTS, (3,), torch.float32, device)
    specs.append(spec)
    hist = []
    for i in range(RING):
        spec, h = _spec(out, f"specdiff_history_{i}", HISTORY, meta_exit.shape, meta_exit.dtype, device, ring=i)
        specs.append(spec)
        hist.append(h)

    # 1. constants that depended on N
    for name, (args, kwargs) in region.templates.items():
        node = nodes[name]
        node.args = _instantiate(args, k, nodes)
        node.kwargs = _instantiate(kwargs, k, nodes)
        node.meta["specdiff"] = TAG_CONST

    # 2. the subset enters the blocks
    with out.graph.inserting_after(entry):
        subset = tag_inserted(out.graph.call_function(token_ops.gather_tokens, (entry, index, 1)), TAG_GATHER, entry)
    for user in list(entry.users):
        if user in in_region:
            user.replace_input_with(entry, subset)

    # 3. full-sequence positions of the computed tokens, one per layout
    positions: dict[tuple, fx.Node] = {}

    def positions_for(layout: TokenAxis) -> fx.Node:
        segs = tuple((kind, int(sympy.sympify(s).subs(N, region.num_tokens))) for kind, s in layout.segments)
        if segs not in positions:
            with out.graph.inserting_after(weights):
                positions[segs] = tag_inserted(out.graph.call_function(token_ops.layout_positions, (index, segs)),
                                       TAG_GATHER, entry)
        return positions[segs]

    # 4. position tables (RoPE) are gathered where they meet token tensors
    for consumer_name, arg_index, axis, layout in region.position_operands:
        consumer = nodes[consumer_name]
        operand = consumer.kwargs[arg_index] if isinstance(arg_index, str) else consumer.args[arg_index]
        with out.graph.inserting_before(consumer):
            gathered = tag_inserted(out.graph.call_function(
                token_ops.gather_positions, (operand, positions_for(layout), axis, _meta(consumer).dim())),
                TAG_GATHER, consumer)
        if isinstance(arg_index, str):
            consumer.update_kwarg(arg_index, gathered)
        else:
            consumer.update_arg(arg_index, gathered)

    # 5. keys/values completed from the per-layer caches
    for i, site in enumerate(s for s in region.sites if s.key_layout is not None):
        sdpa = nodes[site.node]
        for role_name, name in (("k", site.key), ("v", site.value)):
            fresh = nodes[name]
            full_meta = _meta(fresh)
            spec, cache = _spec(out, f"specdiff_{role_name}cache_{i}", KV, full_meta.shape, full_meta.dtype, device)
            specs.append(spec)
            with out.graph.inserting_before(sdpa):
                completed = tag_inserted(out.graph.call_function(
                    token_ops.complete_kv, (cache, fresh, positions_for(site.key_layout), site.key_layout.axis)),
                    TAG_KV, sdpa)
            if fresh in sdpa.args:
                sdpa.update_arg(sdpa.args.index(fresh), completed)
            else:
                key = "key" if role_name == "k" else "value"
                sdpa.update_kwarg(key, completed)

    # 6. exit: compose C1/C2/C3 and run the model's own exit on all tokens
    users = [u for u in exit_node.users]
    with out.graph.inserting_after(exit_node):
        composed = tag_inserted(out.graph.call_function(
            token_ops.compose_tokens, (exit_node, index, hist[0], hist[1], hist[2], weights, reuse_mask)),
            TAG_SCATTER, exit_node)
    with out.graph.inserting_after(composed):
        det = tag_inserted(out.graph.call_method("detach", (composed,)), TAG_WRITE, exit_node)
    with out.graph.inserting_after(det):
        tag_inserted(out.graph.call_method("copy_", (hist[RING_WRITE], det)), TAG_WRITE, exit_node, writes=True)
    for user in users:
        user.replace_input_with(exit_node, composed)
    return _finish(out), specs
