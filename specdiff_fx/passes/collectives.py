"""Finding the collectives in a graph: which nodes call one, which wait on one, and the
process group the graph's output is gathered over.

Why this module exists.  Under diffusers' context parallelism (``ContextParallelConfig`` +
``enable_parallelism``) every attention of a block shards its sequence with functional
collectives that dynamo traces into our graph as ``torch.ops._c10d_functional`` calls:
Ulysses issues ``all_to_all_single`` for q, k, v and the output, the model's exit
``all_gather_into_tensor``\\ s the sequence back, some families gather masks.  Each
collective is followed by a ``wait_tensor``.  The rewrites that handle them
(:mod:`.prune_collectives`, :mod:`.rank_partials`), the policies and the inspection report
(``inspect/collective_traffic.py``) all read collectives through these queries and the one
op table :data:`COLLECTIVE_OPS`.

Read-only: nothing here changes a graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

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


def waits_of(collective: fx.Node) -> list[fx.Node]:
    """The waits on a collective's result(s), through ``getitem`` for coalesced ops."""
    waits, stack = [], list(collective.users)
    while stack:
        user = stack.pop()
        if is_wait(user):
            waits.append(user)
        elif user.op == "call_function" and getattr(user.target, "__name__", "") == "getitem":
            stack.extend(user.users)
    return waits


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
