"""The inspection report: what the analysis found and what each variant does with it.

All facts come from four places, so new policies and node kinds appear without edits here:
the residual branches (``passes``), the variant graphs the backend built (the runtime's
``graphs`` dict, built here with the eager compiler), the ``meta['specdiff']`` tags the
passes put on the nodes they insert or change, and when the runtime runs each variant (its
policy's ``runs_at``, ``specdiff_fx.policies``).

*Status* of a branch or attention site in a variant: whether its heavy ops still run
("computed", "computed on k tokens", "skipped", or "3/7 heavy ops") and the tags of the
rewritten nodes touching it.  The *caching level* of a tag is what the pass that writes it declares
(``passes/tags.py``: "branch" for branch caches and forecasts, "token" for the SpecDiff
kinds, "probe" for a forecast check).

*Token-wise* (can the branch run on a subset of tokens unchanged?) is derived: a body
without attention, convolution or group norm acts on every token separately (linear,
layer norm over channels, activations, adaLN modulation and gating do); the others mix
tokens.  This is structural, not a proof: an op reducing over the token axis elsewhere
would be missed.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..backend import UnsupportedGraph, get_runtime, make_backend
from ..passes import block_of, find_residual_branches, group_nodes_by_block, module_path_of
from ..passes.graph_inputs import find_graph_inputs
from ..passes.graph_queries import is_attention, is_conv, is_heavy, tensor_meta
from ..passes.residual_branches import ResidualBranch
from ..passes.tags import CACHING_LEVELS
from ..policies import POLICIES
from ..passes.token_variants import INDEX
from ..runtime import FULL, CachingRuntime
from .capture import GraphBreaks, capture_graph
from .collective_traffic import CollectivesSummary, collectives_summary
from .cost import (
    N,
    T,
    Cost,
    ModelSizes,
    PropagatedShapes,
    attention_operands,
    cache_bytes,
    graph_flops,
    infer_sizes,
    nodes_flops,
    propagate_shapes,
)
from .graph_diff import GraphDiff, diff

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
    notes: tuple[str, ...] = ()      # caveats on the numbers (unmodelled ops, traced shapes)
    collectives: CollectivesSummary = field(default_factory=CollectivesSummary)  # one call's
    runs_at: str = "-"               # when the runtime runs it (its policy's runs_at)


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
    original_collectives: CollectivesSummary = field(default_factory=CollectivesSummary)
    fallback: str | None = None      # why the backend compiles this graph plainly (names the node)
    frames: tuple[str, ...] = ()     # where the model's code breaks the graph: one line per frame

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
    """``branch_reuse`` -> ``branch``, ``kv_completion`` -> ``token``; unknown tags name themselves."""
    return CACHING_LEVELS.get(tag, tag)


def buffer_name(buffer: Any) -> str:
    """The placeholder name a buffer (a :class:`~specdiff_fx.buffers.BufferSpec`) is passed as."""
    return buffer.name


@dataclass(frozen=True)
class _Variant:
    """A variant graph with the shapes its nodes really have (None: propagation failed)."""

    name: str
    graph: fx.GraphModule
    shapes: PropagatedShapes | None
    nodes: dict[str, fx.Node]


def _status(members: set[str], heavy: list[str], variant: _Variant, sizes: ModelSizes,
            original: dict[str, fx.Node]) -> tuple[str, set[str]]:
    nodes = variant.nodes
    tags = {n.meta["specdiff"] for n in nodes.values() if n.meta.get("specdiff") and (
        n.name in members or any(i.name in members for i in n.all_input_nodes))}
    kept = [h for h in heavy if h in nodes]
    state = ("computed" if len(kept) == len(heavy) else "skipped" if not kept
             else f"{len(kept)}/{len(heavy)} heavy ops")
    if kept and variant.shapes is not None:
        state += _fewer_tokens(original[kept[-1]], variant.shapes.value_of(nodes[kept[-1]]), sizes)
    return (f"{state} · {', '.join(sorted(tags))}" if tags else state), tags


def _fewer_tokens(node: fx.Node, now: torch.Tensor | None, sizes: ModelSizes) -> str:
    """`` on k tokens`` when a rewrite shrank the node's sequence axis, else ''."""
    traced = tensor_meta(node)
    if traced is None or now is None or traced.dim() != now.dim() or traced.dim() < 3:
        return ""
    changed = [i for i, (a, b) in enumerate(zip(traced.shape, now.shape)) if a != b]
    return f" on {sizes.sequence(int(now.shape[changed[0]]))} tokens" if changed else ""


def _token_wise(body: list[fx.Node]) -> str:
    if any(is_attention(n) for n in body):
        return "no: attention"
    if any(is_conv(n) for n in body):
        return "no: conv"
    if any(n.op == "call_function" and n.target in _GROUP_NORM for n in body):
        return "no: group norm"
    return "yes"


def _branch_info(br: ResidualBranch, nodes: dict[str, fx.Node], sizes: ModelSizes,
                 variants: list[_Variant]) -> BranchInfo:
    body = [nodes[n] for n in br.body]
    members = set(br.body) | {br.add, br.output}
    heavy = [n.name for n in body if is_heavy(n)]
    status, levels = {}, set()
    for variant in variants:
        status[variant.name], tags = _status(members, heavy, variant, sizes, nodes)
        levels |= {caching_level(t) for t in tags} | ({"token"} if " tokens" in status[variant.name] else set())
    return BranchInfo(br, _token_wise(body), nodes_flops(body, sizes), status, tuple(sorted(levels)))


def _attention_site(node: fx.Node, branches: list[BranchInfo], sizes: ModelSizes,
                    variants: list[_Variant], nodes: dict[str, fx.Node]) -> AttentionSite:
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
    members = {node.name} | {m for b in owners for m in (b.branch.add, b.branch.output, *b.branch.body)}
    status = {v.name: _status(members, [node.name], v, sizes, nodes)[0] for v in variants}
    heads = 1 if q is None or q.dim() < 4 else int(q.shape[1])
    return AttentionSite(node.name, module_path_of(node), kind, queries, keys, heads,
                         tuple(b.branch.name for b in owners), status)


def _input_modules(variants: list[_Variant], names: set[str]) -> dict[str, str]:
    """Module path of each added input: that of its first user with one in any variant.

    Placeholders carry no module stack, but the nodes reading or writing a cache carry
    the stack of the residual they belong to.
    """
    modules: dict[str, str] = {}
    for variant in variants:
        for node in variant.graph.graph.find_nodes(op="placeholder"):
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


def _prepare(name: str, graph: fx.GraphModule, original: fx.GraphModule, buffers: Sequence[Any]) -> tuple[_Variant, str]:
    nodes = {n.name: n for n in graph.graph.nodes}
    if graph is original:
        return _Variant(name, graph, None, nodes), ""
    try:
        return _Variant(name, graph, propagate_shapes(graph, buffers), nodes), ""
    except Exception as exc:  # report what we can; the note says costs use traced shapes
        return _Variant(name, graph, None, nodes), f"shapes as traced (fake run failed: {type(exc).__name__}: {exc})"


def build_report(original: fx.GraphModule, variants: dict[str, fx.GraphModule],
                 buffers: Mapping[str, Sequence[Any]] | None = None, policy: str = "?", title: str = "graph",
                 subset: int | None = None, runs_at: Mapping[str, str] | None = None) -> InspectionReport:
    """Describe each variant graph against ``original``; ``runs_at[variant]``: when it runs.

    ``buffers[variant]`` are the runtime-owned inputs that variant takes after the graph's
    own (:class:`~specdiff_fx.buffers.BufferSpec`, or objects with its ``name``, ``shape``,
    ``dtype`` and optionally ``role``): they give the shapes to run it with and the cache
    memory (each distinct buffer once).  ``subset``: the token count ``k`` of partial
    variants, by default the length of a buffer whose role is ``index``.
    """
    buffers = dict(buffers or {})
    distinct = list({buffer_name(b): b for specs in buffers.values() for b in specs}.values())
    if subset is None:
        subset = next((int(b.shape[-1]) for b in distinct if getattr(b, "role", None) == INDEX), None)
    # as the backend finds them: a frame without the timestep may be a block traced on its own
    branches = find_residual_branches(original, frame_root_adds=find_graph_inputs(original).timestep_index is None)
    sizes = infer_sizes(original, branches, subset)
    nodes = {n.name: n for n in original.graph.nodes}
    prepared = [_prepare(name, graph, original, buffers.get(name, ())) for name, graph in variants.items()]
    runs = [v for v, _ in prepared]
    infos = [_branch_info(b, nodes, sizes, runs) for b in branches]
    sites = [_attention_site(n, infos, sizes, runs, nodes) for n in original.graph.nodes if is_attention(n)]
    modules = _input_modules(runs, {buffer_name(b) for b in distinct})
    memory_items = []
    for b in distinct:
        path = modules.get(buffer_name(b), "")
        block = block_of(path)
        memory_items.append((block, f"{path[len(block):]}{tuple(b.shape)}", b.shape, b.dtype))
    memory = cache_bytes(memory_items, sizes)
    reports = []
    for run, note in prepared:
        flops = graph_flops(run.graph, sizes, run.shapes)
        notes = tuple(n for n in (note, _unmodelled_note(flops)) if n)
        graph_diff = _attribute_inputs(diff(original, run.graph, name=run.name), modules)
        reports.append(VariantInfo(run.name, run.graph, graph_diff, flops, memory, notes,
                                   collectives_summary(run.graph, branches), (runs_at or {}).get(run.name, "-")))
    return InspectionReport(title, policy, sizes, original, graph_flops(original, sizes), infos, sites,
                            reports, tuple(distinct), collectives_summary(original, branches))


def _unmodelled_note(flops: Cost) -> str:
    if not flops.unmodelled:
        return ""
    ops = ", ".join(f"{op}×{n}" for op, n in flops.unmodelled.items())
    return f"no symbolic rule for {ops}: counted as measured by FlopCounterMode"


def inspect_runtime(runtime: CachingRuntime, original: fx.GraphModule | None = None,
                    title: str = "graph") -> InspectionReport:
    """Report on the graphs a backend built: the variants and buffers of its runtime.

    Reads ``runtime.graphs`` (variant name -> FX graph, plus ``"original"``), so every
    variant a policy adds shows up here without changes to this module.
    """
    graphs = dict(runtime.graphs)
    original = graphs.pop("original", original)
    if runtime.fallback is not None:
        if original is None:
            raise ValueError(f"the backend fell back to a plain compile: {runtime.fallback}")
        return fallback_report(original, runtime.policy, title, runtime.fallback)
    if original is None:
        raise ValueError("this runtime kept no graphs to inspect")
    variants = graphs or {FULL: original}  # policy "off" runs the original graph
    return build_report(original, variants, _variant_buffers(runtime, variants), runtime.policy, title,
                        runs_at=POLICIES[runtime.policy].runs_at)


def fallback_report(original: fx.GraphModule, policy: str, title: str, reason: str) -> InspectionReport:
    """What a model that falls back still shows: its branches and attention sites, the one
    variant that runs (the original graph, compiled plainly) and the reason, which names
    the node the passes stopped at."""
    report = build_report(original, {FULL: original}, {}, policy, title, runs_at={FULL: "every step (plain)"})
    return dataclasses.replace(report, fallback=reason)


def _variant_buffers(runtime: CachingRuntime, variants: dict[str, fx.GraphModule]) -> dict[str, list]:
    """The runtime-owned buffers each variant is called with."""
    return {name: runtime.buffer_specs_for(name) for name in variants}


def inspect_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], policy: str = "fora",
                  title: str = "graph") -> InspectionReport:
    """Build ``policy``'s variants of ``gm`` exactly as the backend does (uncompiled), and report.

    ``gm`` and ``example_inputs`` are what dynamo hands a backend (see :func:`capture_graph`).
    Where the backend would fall back to a plain compile, the report says so with its reason
    (``report.fallback``) and shows the branches and attention sites found.
    """
    backend = make_backend(policy=policy, compiler="eager")
    try:
        runtime = backend.build_runtime(gm, example_inputs)
    except UnsupportedGraph as exc:
        return fallback_report(gm, policy, title, str(exc))
    return inspect_runtime(runtime, gm, title)


def inspect_model(model: torch.nn.Module, example_kwargs: dict[str, Any], policy: str = "fora",
                  title: str | None = None) -> InspectionReport:
    """Capture ``model(**example_kwargs)`` as the backend sees it, then :func:`inspect_graph`.

    Where the model's code breaks the graph, see :func:`inspect_frames`.
    """
    title = title or type(model).__name__
    try:
        gm, example_inputs = capture_graph(model, example_kwargs)
    except GraphBreaks as exc:
        return inspect_frames(model, example_kwargs, policy, title, str(exc))
    return inspect_graph(gm, example_inputs, policy, title)


def inspect_frames(model: torch.nn.Module, example_kwargs: dict[str, Any], policy: str, title: str,
                   why: str = "graph breaks") -> InspectionReport:
    """Report on a model dynamo splits into frames: compile it as a user would (our backend,
    eager compiler, ``fullgraph=False``), call it once, and report the frame that caches the
    most branches (or, if every frame falls back, the largest one).  ``report.frames`` lists
    every frame with what the backend did with it."""
    backend = make_backend(policy=policy, compiler="eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the frames' fallbacks are listed in the report instead
        compiled(**example_kwargs)
    runtimes = [r for r in (ref() for ref, _ in backend._runtimes) if r is not None]
    if not runtimes:
        raise ValueError(f"{why}; dynamo handed the backend no graph")

    def size(r: CachingRuntime) -> int:
        return len(r.graphs["original"].graph.nodes)

    def branches(r: CachingRuntime) -> int:
        return r.stats().get("branches", 0)

    lines = []
    for i, r in enumerate(runtimes):
        did = f"falls back: {r.fallback}" if r.fallback else f"caches {branches(r)} branches"
        lines.append(f"frame {i} ({size(r)} nodes): {did}")
    caching = [r for r in runtimes if r.fallback is None]
    shown = max(caching or runtimes, key=lambda r: (branches(r), size(r)))
    lines.insert(0, f"{why}; {len(runtimes)} frames, {len(caching)} with caching; "
                    f"this report shows frame {runtimes.index(shown)}")
    report = inspect_runtime(shown, title=title)
    return dataclasses.replace(report, frames=tuple(lines))


def inspect_compiled(compiled_model: Any, title: str | None = None) -> InspectionReport:
    """Report on a model already compiled with a specdiff backend and called at least once."""
    view = get_runtime(compiled_model)  # torch.compile(...)'s module, or one compiled in place
    model = getattr(compiled_model, "_orig_mod", compiled_model)
    return inspect_runtime(view.primary, title=title or type(model).__name__)
