"""Which graph inputs are the user's (latents, timestep, text) and which are parameters.

The runtime needs the position of the timestep (to detect steps) and of the user inputs
(to notice a change of shape, dtype or device); parameters are the same tensors every
call and are left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

_MODULE_SOURCE = re.compile(r"^(L\['self'\]|G\[|L\['mod'\])")


@dataclass(frozen=True)
class GraphInputs:
    names: tuple[str, ...]            # placeholder names, in call order
    user_indices: tuple[int, ...]     # inputs that come from the call's args/kwargs
    timestep_index: int | None
    timestep_name: str | None


def _source_name(node: fx.Node) -> str:
    source = getattr(node, "_dynamo_source", None)
    return source.name if source is not None and hasattr(source, "name") else ""


def find_graph_inputs(gm: fx.GraphModule, timestep_hint: str | None = None) -> GraphInputs:
    """Classify placeholders; ``timestep_hint`` is a substring that names the timestep input."""
    nodes = list(gm.graph.find_nodes(op="placeholder"))
    user = []
    for i, node in enumerate(nodes):
        src = _source_name(node)
        if src and not _MODULE_SOURCE.match(src):
            user.append(i)
        elif not src and not node.name.startswith(("l_self_", "L_self_")):
            user.append(i)
    hint = (timestep_hint or "timestep").lower()
    matches = [i for i in user if hint in (_source_name(nodes[i]) + " " + nodes[i].name).lower()]
    exact = [i for i in matches if re.search(rf"\b{re.escape(hint)}\b|'{re.escape(hint)}'|_{re.escape(hint)}_$",
                                             _source_name(nodes[i]) + " " + nodes[i].name)]
    chosen = (exact or matches or [None])[0]
    return GraphInputs(
        names=tuple(n.name for n in nodes),
        user_indices=tuple(user),
        timestep_index=chosen,
        timestep_name=nodes[chosen].name if chosen is not None else None,
    )
