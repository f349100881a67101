"""Which graph inputs are the user's (latents, timestep, text) and which are parameters.

The runtime needs the position of the timestep (to detect steps) and of the user inputs
(to notice a change of shape, dtype or device); parameters are the same tensors every
call and are left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
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


def _is_size(node: fx.Node) -> bool:
    """A placeholder holding a size (a symbolic int of a dynamic graph, read off a tensor
    input or passed as an int), not a tensor."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return True
    return bool(re.search(r"\.(size|stride)\(\)", _source_name(node)))


def is_unused_size(node: fx.Node) -> bool:
    """A size dynamo lifted as an input that no node computes with (the storage offset of
    ``t = scheduler.timesteps[i]``, another each step, when an img2img call's first trace starts
    past step 0): not what the call is about, neither a user input nor a key of a build."""
    return _is_size(node) and not node.users


_SINUSOIDS = {torch.sin, torch.cos, "sin", "cos"}


def _feeds_time_embedding(node: fx.Node, depth: int = 12) -> bool:
    """A scalar or per-row input whose values reach a sin/cos within ``depth`` ops: what every
    diffusers timestep embedding (``get_timestep_embedding``, RoPE-free) does first."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.dim() > 1:
        return False
    frontier, seen = [node], {node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.op in ("call_function", "call_method") and user.target in _SINUSOIDS:
                    return True
                if user not in seen:
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    return False


def find_graph_inputs(gm: fx.GraphModule, timestep_hint: str | None = None) -> GraphInputs:
    """Classify placeholders; ``timestep_hint`` is a substring that names the timestep input."""
    nodes = list(gm.graph.find_nodes(op="placeholder"))
    user = []
    for i, node in enumerate(nodes):
        src = _source_name(node)
        if is_unused_size(node):
            continue
        if src and not _MODULE_SOURCE.match(src):
            user.append(i)
        elif not src and not node.name.startswith(("l_self_", "L_self_")):
            user.append(i)
    hint = (timestep_hint or "timestep").lower()
    # a size of the timestep tensor (``L['timestep'].size()[0]``, a dynamic graph's batch
    # symbol) names it too, and is not it
    tensors = [i for i in user if not _is_size(nodes[i])]
    matches = [i for i in tensors if hint in (_source_name(nodes[i]) + " " + nodes[i].name).lower()]
    exact = [i for i in matches if re.search(rf"\b{re.escape(hint)}\b|'{re.escape(hint)}'|_{re.escape(hint)}_$",
                                             _source_name(nodes[i]) + " " + nodes[i].name)]
    chosen = (exact or matches or [None])[0]
    if chosen is None and timestep_hint is None:
        # passed positionally (``unet(latents, t, ...)`` under a ``*args`` wrapper arrives as
        # ``L['args'][1]``): the input that feeds a sinusoidal timestep embedding
        chosen = next((i for i in tensors if _feeds_time_embedding(nodes[i])), None)
    return GraphInputs(
        names=tuple(n.name for n in nodes),
        user_indices=tuple(user),
        timestep_index=chosen,
        timestep_name=nodes[chosen].name if chosen is not None else None,
    )
