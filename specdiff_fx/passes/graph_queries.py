"""Small read-only queries over torch-level FX graphs shared by the analysis passes."""

from __future__ import annotations

import operator
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

_LINEAR = {F.linear, torch._C._nn.linear}
_CONV = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
         F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_ATTENTION = {F.scaled_dot_product_attention}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm, torch.baddbmm, torch.einsum, torch.mm}
_ADD_TARGETS = {operator.add, operator.iadd, torch.add}
_MUL_TARGETS = {operator.mul, operator.imul, torch.mul}


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_TARGETS
    return node.op == "call_method" and node.target in ("add", "add_", "__add__")


def is_mul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _MUL_TARGETS
    return node.op == "call_method" and node.target in ("mul", "mul_", "__mul__")


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _LINEAR


def is_conv(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CONV


def is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ATTENTION


def is_heavy(node: fx.Node) -> bool:
    """Ops that carry a branch's cost: worth caching only if one of these is skipped."""
    if node.op == "call_function":
        return node.target in _LINEAR | _CONV | _ATTENTION | _MATMUL
    return node.op == "call_method" and node.target in ("matmul", "bmm", "__matmul__")


def tensor_meta(node: fx.Node):
    """The (fake) example value dynamo recorded, if it is a tensor."""
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _closure(nodes: Iterable[fx.Node], step) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [m for n in nodes for m in step(n)]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """All transitive inputs of ``nodes`` (the nodes themselves excluded)."""
    return _closure(nodes, lambda n: n.all_input_nodes)


def descendants(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """All transitive users of ``nodes`` (the nodes themselves excluded)."""
    return _closure(nodes, lambda n: n.users)
