"""The inspection report: what the analysis found and what each variant does with it.

All facts come from three places, so new policies and node kinds appear without edits:
the residual branches (``passes``), the variant graphs the backend built (the runtime's
``graphs`` dict, built here with the eager compiler) and the ``meta['specdiff']`` tags
the passes put on the nodes they insert or change.

*Status* of a branch or attention site in a variant: whether its heavy ops still run
("computed", "skipped", or "3/7 heavy ops" for partial rewrites) and the tags of the
rewritten nodes touching it.  The *caching level* is a tag's prefix (``branch_reuse`` ->
``branch``; token-level kinds are expected to be named ``token_*``).

*Token-wise* (can the branch run on a subset of tokens unchanged?) is derived: a body
without attention, convolution or group norm acts on every token separately (linear,
layer norm over channels, activations, adaLN modulation and gating do); the others mix
tokens.  This is structural, not a proof: an op reducing over the token axis elsewhere
would be missed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..backend import UnsupportedGraph, get_runtime, make_backend
from ..passes import block_of, find_residual_branches, group_nodes_by_block, module_path_of
from ..passes.graph_queries import is_attention, is_conv, is_heavy
from ..passes.residual_branches import ResidualBranch
from ..runtime import FULL, REUSE, SpecDiffRuntime
from .capture import capture_graph
from .cost import N, T, Cost, ModelSizes, attention_operands, cache_bytes, graph_flops, infer_sizes, nodes_flops
from .graph_diff import GraphDiff, diff

_GROUP_NORM = {F.group_norm, torch.group_norm}
RUNS_AT = {FULL: "full steps", REUSE: "cached steps (fora's partial step)"}
"""When the runtime runs each variant; variants not listed show '-'."""


@dataclass(frozen=True)
class BranchInfo:
    branch: ResidualBranch
    token_wise: str                  # "yes", or "no: attention" / "no: conv" / "no: group norm"
    flops: sympy.Expr                # the body's FLOPs per call
    status: dict[str, str]           # variant -> status (see module docstring)
    levels: tuple[str, ...]          # caching levels applied to it in any variant


@dataclass(frozen=True)
class AttentionSite:
    node: str
    module: str
    kind: str                        # "self", "cross" or "joint" (text and image tokens together)
    queries: sympy.Expr              # sequence lengths, symbolic
    keys: sympy.Expr
    heads: int
    branches: tuple[str, ...]        # branches whose body holds it
    status: dict[str, str]

    @property
    def block(self) -> str:
        return block_of(self.module)


@dataclass(frozen=True)
class VariantInfo:
    name: str
    graph: fx.GraphModule
    diff: GraphDiff
    flops: Cost
    cache: Cost

    @property
    def runs_at(self) -> str:
        return RUNS_AT.get(self.name, "-")


@dataclass(frozen=True)
class InspectionReport:
    title: str
    policy: str
    sizes: ModelSizes
    original: fx.GraphModule
    original_flops: Cost
    branches: list[BranchInfo]
    attention: list[AttentionSite]
    variants: list[VariantInfo]
    buffers: tuple = field(default=())

    def flop_ratio(self, variant: VariantInfo) -> float:
        full = self.original_flops.value
        return variant.flops.value / full if full else float("nan")

    def blocks(self) -> list[str]:
        """Blocks in graph order that have a branch, an attention site or a change to show."""
        shown = {b.branch.block for b in self.branches} | {a.block for a in self.attention}
        shown |= {c.block for v in self.variants for c in v.diff.changes}
        order = [b for b in group_nodes_by_block(self.original) if b]
        order += sorted(shown - set(order) - {""}) + [""]  # the root module last
        return [b for b in order if b in shown]


def caching_level(tag: str) -> str:
    return tag.split("_", 1)[0]


def _status(members: set[str], heavy: list[str], graph: fx.GraphModule) -> tuple[str, set[str]]:
    present = {n.name for n in graph.graph.nodes}
    tags = {n.meta["specdiff"] for n in graph.graph.nodes if n.meta.get("specdiff") and (
        n.name in members or any(i.name in members for i in n.all_input_nodes))}
    kept = sum(h in present for h in heavy)
    state = ("computed" if kept == len(heavy) else "skipped" if kept == 0
             else f"{kept}/{len(heavy)} heavy ops")
    return (f"{state} · {', '.join(sorted(tags))}" if tags else state), tags


def _token_wise(body: list[fx.Node]) -> str:
    if any(is_attention(n) for n in body):
        return "no: attention"
    if any(is_conv(n) for n in body):
        return "no: conv"
    if any(n.op == "call_function" and n.target in _GROUP_NORM for n in body):
        return "no: group norm"
    return "yes"


def _branch_info(br: ResidualBranch, nodes: dict[str, fx.Node], sizes: ModelSizes,
                 graphs: dict[str, fx.GraphModule]) -> BranchInfo:
    body = [nodes[n] for n in br.body]
    members = set(br.body) | {br.add, br.output}
    heavy = [n.name for n in body if is_heavy(n)]
    status, levels = {}, set()
    for name, graph in graphs.items():
        status[name], tags = _status(members, heavy, graph)
        levels |= {caching_level(t) for t in tags}
    return BranchInfo(br, _token_wise(body), nodes_flops(body, sizes), status, tuple(sorted(levels)))


def _attention_site(node: fx.Node, branches: list[BranchInfo], sizes: ModelSizes,
                    graphs: dict[str, fx.GraphModule]) -> AttentionSite:
    q, k, _ = attention_operands(node)
    queries = sizes.sequence(int(q.shape[-2])) if q is not None else sympy.nan
    keys = sizes.sequence(int(k.shape[-2])) if k is not None else sympy.nan
    if queries != keys:
        kind = "cross"
    elif {N, T} <= queries.free_symbols:
        kind = "joint"
    else:
        kind = "self"
    owners = [b for b in branches if node.name in b.branch.attention_nodes]
    status = {}
    for name, graph in graphs.items():
        members = {node.name} | {m for b in owners for m in (b.branch.add, b.branch.output, *b.branch.body)}
        status[name], _ = _status(members, [node.name], graph)
    heads = 1 if q is None or q.dim() < 4 else int(q.shape[1])
    return AttentionSite(node.name, module_path_of(node), kind, queries, keys, heads,
                         tuple(b.branch.name for b in owners), status)


def _input_modules(graphs: dict[str, fx.GraphModule], names: set[str]) -> dict[str, str]:
    """Module path of each added input: that of its first user with one in any variant.

    Placeholders carry no module stack, but the nodes reading or writing a cache carry
    the stack of the residual they belong to.
    """
    modules: dict[str, str] = {}
    for graph in graphs.values():
        for node in graph.graph.find_nodes(op="placeholder"):
            if node.name in names and node.name not in modules:
                paths = [p for p in (module_path_of(u) for u in node.users) if p]
                if paths:
                    modules[node.name] = paths[0]
    return modules


def _attribute_inputs(graph_diff: GraphDiff, modules: dict[str, str]) -> GraphDiff:
    """Place added inputs in the module that uses them rather than in ``<root>``."""
    changes = tuple(dataclasses.replace(c, module=modules[c.name])
                    if c.op == "placeholder" and not c.module and c.name in modules else c
                    for c in graph_diff.changes)
    return dataclasses.replace(graph_diff, changes=changes)


def build_report(original: fx.GraphModule, variants: dict[str, fx.GraphModule], buffers: Sequence[Any] = (),
                 policy: str = "?", title: str = "graph") -> InspectionReport:
    """Describe each variant graph against ``original``.

    ``buffers`` are the runtime-owned inputs the variants take (anything with ``name``,
    ``shape`` and ``dtype``, e.g. the runtime's ``BufferSpec``); they give the cache memory.
    """
    branches = find_residual_branches(original)
    sizes = infer_sizes(original, branches)
    nodes = {n.name: n for n in original.graph.nodes}
    infos = [_branch_info(b, nodes, sizes, variants) for b in branches]
    sites = [_attention_site(n, infos, sizes, variants) for n in original.graph.nodes if is_attention(n)]
    modules = _input_modules(variants, {b.name for b in buffers})
    memory_items = []
    for b in buffers:
        path = modules.get(b.name, "")
        block = block_of(path)
        memory_items.append((block, f"{path[len(block):]}{tuple(b.shape)}", b.shape, b.dtype))
    memory = cache_bytes(memory_items, sizes)
    reports = [VariantInfo(name, graph, _attribute_inputs(diff(original, graph, name=name), modules),
                           graph_flops(graph, sizes), memory)
               for name, graph in variants.items()]
    return InspectionReport(title, policy, sizes, original, graph_flops(original, sizes), infos, sites,
                            reports, tuple(buffers))


def inspect_runtime(runtime: SpecDiffRuntime, original: fx.GraphModule | None = None,
                    title: str = "graph") -> InspectionReport:
    """Report on the graphs a backend built: the variants and buffers of its runtime.

    Reads ``runtime.graphs`` (variant name -> FX graph, plus ``"original"``), so every
    variant a policy adds shows up here without changes to this module.
    """
    graphs = dict(runtime.graphs)
    original = graphs.pop("original", original)
    if runtime.fallback is not None:
        raise ValueError(f"the backend fell back to a plain compile: {runtime.fallback}")
    if original is None:
        raise ValueError("this runtime kept no graphs to inspect")
    variants = graphs or {FULL: original}  # policy "off" runs the original graph
    return build_report(original, variants, runtime.slots.specs, runtime.policy, title)


def inspect_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], policy: str = "fora",
                  title: str = "graph") -> InspectionReport:
    """Build ``policy``'s variants of ``gm`` exactly as the backend does (uncompiled), and report.

    ``gm`` and ``example_inputs`` are what dynamo hands a backend (see :func:`capture_graph`).
    Raises ValueError where the backend would fall back to a plain compile, with its reason.
    """
    backend = make_backend(policy=policy, compiler="eager")
    try:
        runtime = backend.build_runtime(gm, example_inputs)
    except UnsupportedGraph as exc:
        raise ValueError(f"the backend would fall back to a plain compile: {exc}") from exc
    return inspect_runtime(runtime, gm, title)


def inspect_model(model: torch.nn.Module, example_kwargs: dict[str, Any], policy: str = "fora",
                  title: str | None = None) -> InspectionReport:
    """Capture ``model(**example_kwargs)`` as the backend sees it, then :func:`inspect_graph`."""
    gm, example_inputs = capture_graph(model, example_kwargs)
    return inspect_graph(gm, example_inputs, policy, title or type(model).__name__)


def inspect_compiled(compiled_model: Any, title: str | None = None) -> InspectionReport:
    """Report on a model already compiled with a specdiff backend and called at least once."""
    runtime = get_runtime(compiled_model)
    return inspect_runtime(runtime, title=title or type(compiled_model._orig_mod).__name__)
