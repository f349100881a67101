"""The inspection report: what the analysis found and what each variant does with it.

All facts come from three places, so new policies and node kinds appear without edits:
the residual branches (``passes``), the variant dict (``variants``) and the
``meta['specdiff']`` tags the passes put on the nodes they insert or change.

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

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..passes import block_of, find_residual_branches, group_nodes_by_block, module_path_of
from ..passes.graph_queries import is_attention, is_conv, is_heavy
from ..passes.residual_branches import ResidualBranch
from .capture import capture_graph
from .cost import N, T, Cost, ModelSizes, attention_operands, cache_bytes, graph_flops, infer_sizes, nodes_flops
from .graph_diff import GraphDiff, diff
from .variants import RUNS_AT, build_variants

_GROUP_NORM = {F.group_norm, torch.group_norm}


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
        order = list(group_nodes_by_block(self.original))
        order += sorted(shown - set(order))
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


def inspect_graph(gm: fx.GraphModule, policy: str = "fora", title: str = "graph") -> InspectionReport:
    """Analyse ``gm``, build ``policy``'s variants and describe each against ``gm``. Pure."""
    branches = find_residual_branches(gm)
    variants = build_variants(gm, branches, policy)
    sizes = infer_sizes(gm, branches)
    nodes = {n.name: n for n in gm.graph.nodes}
    infos = [_branch_info(b, nodes, sizes, variants.graphs) for b in branches]
    sites = [_attention_site(n, infos, sizes, variants.graphs) for n in gm.graph.nodes if is_attention(n)]
    owners = {b.name: b for b in branches}
    buffers = []
    for spec in variants.buffers:
        owner = owners.get(spec.branch)
        block = owner.block if owner else block_of(spec.branch.split(":")[0])
        what = owner.name.split(":", 1)[-1] if owner else spec.branch
        buffers.append((block, what, spec.shape, spec.dtype))
    memory = cache_bytes(buffers, sizes)
    reports = [VariantInfo(name, graph, diff(gm, graph, name=name), graph_flops(graph, sizes), memory)
               for name, graph in variants.graphs.items()]
    return InspectionReport(title, policy, sizes, gm, graph_flops(gm, sizes), infos, sites, reports,
                            variants.buffers)


def inspect_model(model: torch.nn.Module, example_kwargs: dict[str, Any], policy: str = "fora",
                  title: str | None = None) -> InspectionReport:
    """Capture ``model(**example_kwargs)`` as the backend sees it, then :func:`inspect_graph`."""
    gm, _ = capture_graph(model, example_kwargs)
    return inspect_graph(gm, policy, title or type(model).__name__)
