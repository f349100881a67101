"""Module-path analysis: turn dynamo's ``nn_module_stack`` into readable paths and blocks.

Dynamo records where each node came from as source strings such as
``L['self'].__dict__['_modules']['transformer_blocks'].0.attn1``.  Every later pass
(branch discovery, reports, diffs) talks about ``transformer_blocks.0.attn1``, so the
normalisation lives in one place.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch.fx as fx

_MODULES_DICT = re.compile(r"\.?(?:__dict__\[)?\[?'_modules'\]\[?'([^']+)'\]")
_SUBSCRIPT_STR = re.compile(r"\['([^']+)'\]")
_SUBSCRIPT_INT = re.compile(r"\[(\d+)\]")
_ROOT = re.compile(r"^L\['[^']+'\]\.?")
# Hooks that wrap ``forward`` (diffusers' context-parallel hooks, for one) make dynamo reach a
# module through its bound method (``forward.__self__``) or the closure cell of a wrapper
# (``forward.func.__closure__[0].cell_contents``): both name the module itself.
_HOOK_WRAPPER = re.compile(r"(?:^|\.)forward\.(?:__self__|func\.__closure__\.\d+\.cell_contents)(?=\.|$)")


def normalize_module_path(raw: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].0.attn`` -> ``blocks.0.attn``."""
    path = raw.replace(".__dict__['_modules']", "['_modules']")
    path = re.sub(r"\['_modules'\]\['([^']+)'\]", r".\1", path)
    path = _ROOT.sub("", path)
    path = re.sub(r"^L\['[^']+'\]", "", path)
    path = _SUBSCRIPT_STR.sub(r".\1", path)
    path = _SUBSCRIPT_INT.sub(r".\1", path)
    path = re.sub(r"\.+", ".", path)
    path = _HOOK_WRAPPER.sub("", path)
    return path.strip(".")


def module_path_of(node: fx.Node) -> str:
    """Innermost module the node was traced in ('' for the root module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    raw = list(stack.values())[-1][0]
    return normalize_module_path(str(raw))


def block_of(path: str) -> str:
    """The repeated unit a module path belongs to: its prefix up to the first list index.

    ``transformer_blocks.3.attn.to_q`` -> ``transformer_blocks.3``;
    ``down_blocks.0.resnets.1.conv1`` -> ``down_blocks.0``; paths with no index
    (``proj_out``) are their own top-level component.
    """
    if not path:
        return ""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def group_nodes_by_block(gm: fx.GraphModule) -> "OrderedDict[str, list[fx.Node]]":
    """Compute nodes grouped by block, in graph order (placeholders and output excluded)."""
    groups: OrderedDict[str, list[fx.Node]] = OrderedDict()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        groups.setdefault(block_of(module_path_of(node)), []).append(node)
    return groups
