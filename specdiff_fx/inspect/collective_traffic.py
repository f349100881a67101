"""Collective traffic of a graph, for the inspection report: one row per collective with its
op, the module path and residual branch it belongs to, the local (per-rank) token count of that
branch, and its message size in bytes by formula from the recorded shapes and dtypes.

Why here and not in passes/: only the inspection report (and the context-parallel tests) read
it; the passes need only to find collectives (passes/collectives.py).  Pure analysis: the graph
is not modified.

Sizes follow the nccl-tests convention (``size``: the message of the op; ``bus``: what each
rank sends over the wire with a ring/pairwise algorithm), read off each op's entry of
``passes.collectives.COLLECTIVE_OPS``:

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
from typing import Any, Iterable

import torch
import torch.fx as fx

from ..passes.collectives import COLLECTIVE_OPS, CollectiveOp, collective_op, find_collectives
from ..passes.graph_queries import tensor_meta
from ..passes.module_paths import block_of, module_path_of

log = logging.getLogger(__name__)


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

    ``branches`` are :class:`~specdiff_fx.passes.residual_branches.ResidualBranch` es of ``gm`` (found here
    when not given); ``group_size`` overrides what the graph and a live process group
    say.  Pure analysis: ``gm`` is not modified.
    """
    if branches is None:
        from ..passes.residual_branches import find_residual_branches

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
