"""Branch-level cache variants (FORA-style): *record* and *reuse* graphs from one graph.

* record: the original computation, plus ``cache_i.copy_(g_i.detach())`` right after each
  branch's cached value ``g_i`` (its output, or the output before its gate).  The
  caches are runtime-owned inputs written in place, so a full
  step costs one copy per branch and no extra outputs.
* reuse: each branch's consumer (the gate mul, or the residual add) reads ``cache_i``
  instead of ``g_i``; dead-code elimination then drops the branch bodies (norms,
  projections, attention, MLP) while the cheap gates stay live.

Both variants take the original inputs followed by the caches in the same order, so the
runtime can hand the same buffer list to either.

``cache_dtype`` (e.g. ``torch.bfloat16``) holds the caches in a narrower dtype than the model
computes in: the record's ``copy_`` rounds, and the reuse variant reads the cache through a
cast back to the branch's own dtype, so every op downstream sees the dtype it had.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..buffers import BufferRole, BufferSpec, shape_exprs, symbolic_example
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

RECORD_TAG = "branch_record"
REUSE_TAG = "branch_reuse"
CACHE_INPUT_TAG = "branch_cache_input"
CACHING_LEVELS = dict.fromkeys((RECORD_TAG, REUSE_TAG, CACHE_INPUT_TAG), "branch")
"""The caching level of each tag this pass writes into ``node.meta["specdiff"]`` (passes/tags.py)."""
BRANCH_CACHE = BufferRole.BRANCH_CACHE


def _cache_specs(gm: fx.GraphModule, branches: list[ResidualBranch],
                 cache_dtype: torch.dtype | None = None) -> list[BufferSpec]:
    specs = []
    for i, br in enumerate(branches):
        meta = tensor_meta(find_node(gm, br.cached))
        if meta is None:
            raise ValueError(f"branch {br.name}: value {br.cached!r} has no tensor metadata")
        specs.append(
            BufferSpec(
                name=f"specdiff_cache_{i}",
                role=BRANCH_CACHE,
                branch=br.name,
                shape=shape_exprs(meta.shape), example_shape=symbolic_example(meta.shape),
                dtype=cache_dtype if cache_dtype is not None and meta.dtype.is_floating_point else meta.dtype,
                device=meta.device,
            )
        )
    return specs


def _copy_with_cache_inputs(gm: fx.GraphModule, branches: list[ResidualBranch],
                            cache_dtype: torch.dtype | None = None):
    """A copy of ``gm`` with one cache input per branch: (copy, specs, [(branch, cache node)])."""
    specs = _cache_specs(gm, branches, cache_dtype)
    out = copy_graph_module(gm)
    caches = [add_static_input(out, spec.name, kind=CACHE_INPUT_TAG) for spec in specs]
    return out, specs, list(zip(branches, caches))


def build_branch_record_variant(
    gm: fx.GraphModule, branches: list[ResidualBranch], cache_dtype: torch.dtype | None = None
) -> tuple[fx.GraphModule, list[BufferSpec]]:
    """Copy of ``gm`` that also writes every branch output into its cache input."""
    out, specs, pairs = _copy_with_cache_inputs(gm, branches, cache_dtype)
    for br, cache in pairs:
        value = find_node(out, br.cached)
        add = find_node(out, br.add)
        with out.graph.inserting_after(value):
            detached = tag_inserted(out.graph.call_method("detach", (value,)), RECORD_TAG, add)
        with out.graph.inserting_after(detached):
            tag_inserted(out.graph.call_method("copy_", (cache, detached)), RECORD_TAG, add)
    return recompile(out), specs


def build_branch_reuse_variant(
    gm: fx.GraphModule, branches: list[ResidualBranch], cache_dtype: torch.dtype | None = None
) -> tuple[fx.GraphModule, list[BufferSpec]]:
    """Copy of ``gm`` where every residual add reads its branch from the cache input."""
    out, specs, pairs = _copy_with_cache_inputs(gm, branches, cache_dtype)
    for (br, cache), spec in zip(pairs, specs):
        consumer = find_node(out, br.add if br.cached == br.output else br.output)
        value = find_node(out, br.cached)
        read = cache
        own = tensor_meta(value).dtype
        if spec.dtype != own:
            with out.graph.inserting_before(consumer):
                read = tag_inserted(out.graph.call_method("to", (cache, own)), REUSE_TAG, consumer)
        consumer.replace_input_with(value, read)
        consumer.meta["specdiff"] = REUSE_TAG
    eliminate_dead_code_keeping_writes(out)
    return recompile(out), specs
