"""Collectives in a graph: what they are, what they cost, and dropping the ones nobody reads.

Why this pass exists.  Under diffusers' context parallelism (``ContextParallelConfig`` +
``enable_parallelism``) every attention of a block shards its sequence with functional
collectives that dynamo traces into our graph as ``torch.ops._c10d_functional`` calls:
Ulysses issues ``all_to_all_single`` for q, k, v and the output, the model's exit
``all_gather_into_tensor``\\ s the sequence back, some families gather masks.  Each
collective is followed by a ``wait_tensor``, which is *impure* (it waits on an
asynchronous handle), so ``Graph.eliminate_dead_code`` never drops it -- and with it
everything upstream stays alive too.  A reuse variant that reads its branch outputs from
caches therefore still projects q/k/v and still pays the whole all-to-all traffic of
the branches it no longer computes.  :func:`prune_dead_collectives` removes exactly the
collectives (with their waits and the pure nodes that only fed them) whose results
reach nothing the graph still needs.

Why it is safe on every rank.  A collective only completes if every rank of its group
issues it.  The decision here is purely structural -- it looks at graph edges, never
at tensor values, rank ids or timing -- and every rank traces the same program into the
same graph, so every rank removes the same collectives, in the same order.  Collectives
that mutate their input (``*_`` in-place forms) or whose outputs reach the graph output
or a side effect (a cache write) are kept.

:func:`collectives_summary` is the read-only companion: one row per collective with its
op, the module path and residual branch it belongs to, the local (per-rank) token count
of that branch, and its message size in bytes by formula from the recorded shapes and
dtypes.  Sizes follow the nccl-tests convention (``size``: the message of the op;
``bus``: what each rank sends over the wire with a ring/pairwise algorithm):

================  ===============================  =====================
op                size                             bus factor (n ranks)
================  ===============================  =====================
all_to_all        input bytes                      (n - 1) / n
all_gather        output bytes (n x input)         (n - 1) / n
reduce_scatter    input bytes                      (n - 1) / n
all_reduce        input bytes                      2 (n - 1) / n
isend / irecv     tensor bytes                     1
================  ===============================  =====================
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from .graph_copy import copy_graph_module, live_nodes_keeping_writes, recompile
from .graph_queries import tensor_meta
from .module_paths import block_of, module_path_of

log = logging.getLogger(__name__)

NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd")
WAIT = "wait_tensor"

ALL_TO_ALL = "all_to_all"
ALL_GATHER = "all_gather"
REDUCE_SCATTER = "reduce_scatter"
ALL_REDUCE = "all_reduce"
P2P = "p2p"


def _ring(n: int) -> float:
    return (n - 1) / n


def _all_reduce_factor(n: int) -> float:
    return 2 * (n - 1) / n


@dataclass(frozen=True)
class CollectiveOp:
    """How to read one functional collective off a graph node."""

    kind: str
    size_of: str                        # "input" or "output": which tensor is the message
    bus_factor: Callable[[int], float]  # bytes on the wire per rank = size * factor(n)
    group_size_arg: int | None = None   # positional index of an explicit group size
    split_sizes_arg: int | None = None  # positional index of a per-rank split list
    inplace: bool = False               # mutates its input: never pruned


COLLECTIVE_OPS: dict[str, CollectiveOp] = {
    "all_to_all_single": CollectiveOp(ALL_TO_ALL, "input", _ring, split_sizes_arg=1),
    "all_gather_into_tensor": CollectiveOp(ALL_GATHER, "output", _ring, group_size_arg=1),
    "all_gather_into_tensor_coalesced": CollectiveOp(ALL_GATHER, "output", _ring, group_size_arg=1),
    "reduce_scatter_tensor": CollectiveOp(REDUCE_SCATTER, "input", _ring, group_size_arg=2),
    "reduce_scatter_tensor_coalesced": CollectiveOp(REDUCE_SCATTER, "input", _ring, group_size_arg=2),
    "all_reduce": CollectiveOp(ALL_REDUCE, "input", _all_reduce_factor),
    "all_reduce_coalesced": CollectiveOp(ALL_REDUCE, "input", _all_reduce_factor),
    "all_reduce_": CollectiveOp(ALL_REDUCE, "input", _all_reduce_factor, inplace=True),
    "all_reduce_coalesced_": CollectiveOp(ALL_REDUCE, "input", _all_reduce_factor, inplace=True),
    "broadcast": CollectiveOp(P2P, "input", lambda n: 1.0),
    "broadcast_": CollectiveOp(P2P, "input", lambda n: 1.0, inplace=True),
    "isend": CollectiveOp(P2P, "input", lambda n: 1.0),
    "irecv": CollectiveOp(P2P, "input", lambda n: 1.0),
    "batch_p2p_ops": CollectiveOp(P2P, "input", lambda n: 1.0),
}
"""Every ``_c10d_functional`` op we know, by op name (both namespaces share the table)."""


def _op_name(node: fx.Node) -> str | None:
    """``"all_to_all_single"`` for a functional-collective call (packet or overload)."""
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        namespace, name = target.namespace, target._opname
    elif isinstance(target, torch._ops.OpOverloadPacket):
        namespace, _, name = target._qualified_op_name.partition("::")
    else:
        return None
    return name if namespace in NAMESPACES else None


def collective_op(node: fx.Node) -> str | None:
    """The collective's op name if ``node`` issues one (``wait_tensor`` excluded)."""
    name = _op_name(node)
    return name if name in COLLECTIVE_OPS else None


def is_collective(node: fx.Node) -> bool:
    return collective_op(node) is not None


def is_wait(node: fx.Node) -> bool:
    return _op_name(node) == WAIT


def find_collectives(gm: fx.GraphModule) -> list[fx.Node]:
    """Collective nodes of ``gm`` in graph order (waits excluded)."""
    return [n for n in gm.graph.nodes if is_collective(n)]


def has_collectives(gm: fx.GraphModule) -> bool:
    return any(is_collective(n) for n in gm.graph.nodes)


# ------------------------------------------------------------------------------- pruning
def _is_root(node: fx.Node) -> bool:
    """A node that must stay regardless of its users: outputs, inputs, side effects.

    An in-place write is no root by itself: it lives when the tensor it writes is read
    (or is a graph input), see :func:`~.graph_copy.live_nodes_keeping_writes`.  Counting every
    write as a root would keep diffusers' gathered-mask copies, and with them the mask
    all-gathers, in a variant whose attention is gone.
    """
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    op = collective_op(node)
    if op is not None:
        return COLLECTIVE_OPS[op].inplace
    if is_wait(node):
        return False  # kept iff its collective is kept (see _waits_of)
    return node.is_impure() or bool(node.meta.get("specdiff_writes"))


def _waits_of(collective: fx.Node) -> list[fx.Node]:
    """The waits on a collective's result(s), through ``getitem`` for coalesced ops."""
    waits, stack = [], list(collective.users)
    while stack:
        user = stack.pop()
        if is_wait(user):
            waits.append(user)
        elif user.op == "call_function" and getattr(user.target, "__name__", "") == "getitem":
            stack.extend(user.users)
    return waits


def live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes the graph needs: the roots, their inputs, every in-place write into a tensor
    that is still read, and every wait of a live collective."""
    return live_nodes_keeping_writes(
        gm.graph, _is_root,
        also=lambda n: _waits_of(n) if is_collective(n) else ())  # an issued collective is always waited on


def prune_dead_collectives(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` without the collectives (and their waits, and the pure nodes that
    only fed them) whose results reach neither the output nor a side effect.

    Purely structural, hence identical on every rank.  ``gm`` is not modified.
    """
    out = copy_graph_module(gm)
    live = live_nodes(out)
    dead = [n for n in out.graph.nodes if n not in live]
    removed = Counter(collective_op(n) for n in dead if is_collective(n))
    for node in reversed(dead):
        out.graph.erase_node(node)
    if removed:
        log.info("pruned %d dead collective(s) %s and %d other node(s)",
                 sum(removed.values()), dict(removed), len(dead) - 2 * sum(removed.values()))
    return recompile(out)


# ------------------------------------------------------------------------------- rank partials
RANK_PARTIAL = "specdiff_rank_partial"
"""``node.meta[RANK_PARTIAL] = "sum"`` marks a value that is a partial over this rank's tokens
(a sum over the local shard).  Under context parallelism :func:`reduce_rank_partials` replaces
it by its all-reduce, so a decision made from it is the same on every rank."""
RANK_REDUCE_TAG = "rank_reduce"
CACHING_LEVELS = {RANK_REDUCE_TAG: "ranks"}
"""Not a caching level: the all-reduces this pass adds (passes/tags.py)."""


def output_group(gm: fx.GraphModule) -> Any | None:
    """The process group of the last collective the graph output depends on.

    diffusers' context-parallel plans gather the output over the whole context-parallel mesh,
    so this is the group a rank-local partial must be reduced over.  None: no such collective.
    """
    output = next(iter(gm.graph.find_nodes(op="output")))
    feeding = set()
    stack = list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node not in feeding:
            feeding.add(node)
            stack.extend(node.all_input_nodes)
    last = [n for n in gm.graph.nodes if n in feeding and is_collective(n)]
    return last[-1].args[-1] if last and last[-1].args else None


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


# ------------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class CollectiveCall:
    """One collective of a graph, with its size by formula (None where not static)."""

    node: str
    op: str
    kind: str
    module: str
    block: str
    branch: str | None          # the residual branch whose body holds it (None: outside)
    tokens: int | None          # that branch's local (per-rank, sharded) token count
    shape: tuple[int, ...]      # of the message tensor (first one for coalesced ops)
    dtype: str
    group_size: int | None
    bytes: int | None           # message size (see the module docstring's table)
    bus_bytes: int | None       # bytes each rank sends: bytes * bus factor


@dataclass(frozen=True)
class CollectivesSummary:
    calls: tuple[CollectiveCall, ...] = field(default=())

    @property
    def count(self) -> int:
        return len(self.calls)

    def counts(self) -> dict[str, int]:
        """``{"all_to_all_single": 8, "all_gather_into_tensor": 1}``."""
        return dict(Counter(c.op for c in self.calls))

    def total_bytes(self) -> int | None:
        sizes = [c.bytes for c in self.calls]
        return None if any(s is None for s in sizes) else sum(sizes)

    def total_bus_bytes(self) -> int | None:
        sizes = [c.bus_bytes for c in self.calls]
        return None if any(s is None for s in sizes) else sum(sizes)

    def by_branch(self) -> dict[str, int]:
        """Collectives per branch name (``"<outside>"`` for those in no branch body)."""
        return dict(Counter(c.branch or "<outside>" for c in self.calls))

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "counts": self.counts(),
            "bytes": self.total_bytes(),
            "bus_bytes": self.total_bus_bytes(),
            "calls": [asdict(c) for c in self.calls],
        }


def _static_numel(t: torch.Tensor) -> int | None:
    try:
        return int(t.numel())
    except Exception:  # symbolic sizes
        return None


def _tensors(arg: Any) -> list[torch.Tensor]:
    nodes = arg if isinstance(arg, (list, tuple)) else [arg]
    metas = [tensor_meta(n) if isinstance(n, fx.Node) else None for n in nodes]
    return [m for m in metas if m is not None] if all(m is not None for m in metas) else []


def _resolve_group_size(group_name: Any) -> int | None:
    """Size of a named process group when one is live in this process (else unknown)."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        from torch.distributed.distributed_c10d import _resolve_process_group

        return int(_resolve_process_group(group_name).size())
    except Exception:
        return None


def _group_size(node: fx.Node, spec: CollectiveOp) -> int | None:
    if spec.group_size_arg is not None and len(node.args) > spec.group_size_arg:
        value = node.args[spec.group_size_arg]
        if isinstance(value, int):
            return value
    if spec.split_sizes_arg is not None and len(node.args) > spec.split_sizes_arg:
        splits = node.args[spec.split_sizes_arg]
        if isinstance(splits, (list, tuple)) and splits:
            return len(splits)
    return _resolve_group_size(node.args[-1] if node.args else node.kwargs.get("group_name"))


def _message(node: fx.Node, spec: CollectiveOp) -> list[torch.Tensor]:
    if spec.size_of == "output":
        own = tensor_meta(node)
        if own is not None:
            return [own]
        values = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(values, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in values):
            return list(values)
    if collective_op(node) == "batch_p2p_ops":  # (op_list, peer_list, tag_list, tensors, group)
        return _tensors(node.args[3]) if len(node.args) > 3 else []
    return _tensors(node.args[0]) if node.args else []


def describe_collective(node: fx.Node, branch_of: dict[str, Any] | None = None,
                        group_size: int | None = None) -> CollectiveCall:
    """One :class:`CollectiveCall` for a collective node (see :func:`collectives_summary`)."""
    op = collective_op(node)
    if op is None:
        raise ValueError(f"{node.name} is not a functional collective")
    spec = COLLECTIVE_OPS[op]
    n = group_size if group_size is not None else _group_size(node, spec)
    message = _message(node, spec)
    numels = [_static_numel(t) for t in message]
    size = None
    if message and all(x is not None for x in numels):
        size = sum(x * t.element_size() for x, t in zip(numels, message))
    bus = int(round(size * spec.bus_factor(n))) if size is not None and n else None
    branch = (branch_of or {}).get(node.name)
    tokens = None
    if branch is not None and len(branch.shape) == 3:
        tokens = int(branch.shape[1])
    path = module_path_of(node)
    return CollectiveCall(
        node=node.name,
        op=op,
        kind=spec.kind,
        module=path,
        block=block_of(path),
        branch=branch.name if branch is not None else None,
        tokens=tokens,
        shape=tuple(int(s) for s in message[0].shape) if message and numels[0] is not None else (),
        dtype=str(message[0].dtype).replace("torch.", "") if message else "",
        group_size=n,
        bytes=size,
        bus_bytes=bus,
    )


def collectives_summary(gm: fx.GraphModule, branches: Iterable[Any] | None = None,
                        group_size: int | None = None) -> CollectivesSummary:
    """Every collective of ``gm``: op, module path, owning branch, local tokens, bytes.

    ``branches`` are :class:`~.residual_branches.ResidualBranch` es of ``gm`` (found here
    when not given); ``group_size`` overrides what the graph and a live process group
    say.  Pure analysis: ``gm`` is not modified.
    """
    if branches is None:
        from .residual_branches import find_residual_branches

        try:
            branches = find_residual_branches(gm)
        except Exception as exc:  # an analysis for reports: never fail the caller
            log.debug("collectives_summary: no branches (%s)", exc)
            branches = []
    branch_of: dict[str, Any] = {}
    for br in branches:
        for name in br.body:
            branch_of.setdefault(name, br)
    return CollectivesSummary(tuple(
        describe_collective(n, branch_of, group_size) for n in find_collectives(gm)
    ))
