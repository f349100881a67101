"""What a rewrite did to a graph: nodes added, removed and changed, and a code diff.

Nodes are matched by name: variants are built on copies that keep every node's name
(``passes.graph_copy``), so a name present in both graphs is the same computation.
Each change carries the ``meta['specdiff']`` tag the pass put on the node (its *kind*)
and the module path it belongs to, so new kinds of inserted nodes show up here without
any change to this module.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass

import torch.fx as fx

from ..passes import block_of, module_path_of

ADDED, REMOVED, CHANGED = "added", "removed", "changed"
UNTAGGED = "-"


@dataclass(frozen=True)
class NodeChange:
    change: str          # ADDED, REMOVED or CHANGED
    name: str
    op: str              # "placeholder", "call_function", ...
    target: str          # readable target: "linear", "copy_", "scaled_dot_product_attention"
    kind: str            # meta['specdiff'] tag, UNTAGGED if none
    module: str          # module path ('' for the root module)

    @property
    def block(self) -> str:
        return block_of(self.module)


@dataclass(frozen=True)
class GraphDiff:
    changes: tuple[NodeChange, ...]
    code_diff: str       # unified diff of the graphs' code (see code_lines), '' if identical

    @property
    def is_empty(self) -> bool:
        return not self.changes and not self.code_diff

    def of(self, change: str) -> list[NodeChange]:
        return [c for c in self.changes if c.change == change]

    def counts(self) -> dict[str, int]:
        """``{"added": 8, "removed": 0, "changed": 0}``."""
        counted = Counter(c.change for c in self.changes)
        return {k: counted.get(k, 0) for k in (ADDED, REMOVED, CHANGED)}

    def kinds(self) -> dict[str, int]:
        """How many added or changed nodes carry each tag: ``{"branch_record": 8, ...}``."""
        return dict(Counter(c.kind for c in self.changes if c.kind != UNTAGGED))

    def grouped(self, by_module: bool = False) -> list[tuple[str, str, str, int, str]]:
        """Rows ``(change, kind, block or module, count, targets)`` in first-seen order."""
        groups: dict[tuple[str, str, str], Counter] = {}
        for c in self.changes:
            key = (c.change, c.kind, c.module if by_module else c.block)
            groups.setdefault(key, Counter())[c.target] += 1
        return [(change, kind, where or "<root>", sum(t.values()), _targets(t))
                for (change, kind, where), t in groups.items()]


def _targets(counter: Counter) -> str:
    return ", ".join(f"{t}×{n}" if n > 1 else t for t, n in counter.most_common())


def target_name(node: fx.Node) -> str:
    if node.op in ("call_function", "call_module"):
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _signature(node: fx.Node) -> tuple:
    """What a node computes, with its inputs named: equal signatures mean an unchanged node."""
    named = fx.node.map_arg((node.args, node.kwargs), lambda n: n.name)
    return node.op, target_name(node), repr(named), node.meta.get("specdiff")


def _change(change: str, node: fx.Node) -> NodeChange:
    return NodeChange(change, node.name, node.op, target_name(node),
                      node.meta.get("specdiff") or UNTAGGED, module_path_of(node))


_SIGNATURE = re.compile(r"^def forward\((.*)\)(.*):$")
_ARGUMENT_BREAK = re.compile(r", (?=[A-Za-z_]\w*\s*(?::|,|$))")
_RELEASE = re.compile(r";\s+(?:[A-Za-z_]\w* = )+None$")


def code_lines(gm: fx.GraphModule) -> list[str]:
    """``gm.code`` normalised for diffing, without changing what it computes.

    One forward argument per line, so an added input is one diff line rather than a
    change to a signature thousands of characters long; and without the ``;  x = None``
    clauses fx appends to free values, which change whenever a later user is removed.
    """
    lines = []
    for line in gm.code.strip("\n").splitlines():
        match = _SIGNATURE.match(line)
        if match is None:
            lines.append(_RELEASE.sub("", line))
            continue
        lines.append("def forward(")
        lines += [f"        {arg}," for arg in _ARGUMENT_BREAK.split(match.group(1))]
        lines.append(f"){match.group(2)}:")
    return lines


def diff(original_gm: fx.GraphModule, rewritten_gm: fx.GraphModule, *,
         name: str = "rewritten", context: int = 3) -> GraphDiff:
    """Node-level and code-level difference between a graph and its rewrite.

    Removed nodes keep the original's module path (they have no tag: a rewrite drops
    nodes by making them dead); added and changed nodes carry their ``specdiff`` tag.
    """
    before = {n.name: n for n in original_gm.graph.nodes}
    after = {n.name: n for n in rewritten_gm.graph.nodes}
    changes = [_change(REMOVED, n) for node_name, n in before.items() if node_name not in after]
    for node_name, node in after.items():
        old = before.get(node_name)
        if old is None:
            changes.append(_change(ADDED, node))
        elif _signature(old) != _signature(node):
            changes.append(_change(CHANGED, node))
    code = "\n".join(difflib.unified_diff(
        code_lines(original_gm), code_lines(rewritten_gm),
        fromfile="original", tofile=name, lineterm="", n=context))
    return GraphDiff(tuple(changes), code)
