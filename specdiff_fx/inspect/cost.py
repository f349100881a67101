"""Symbolic cost of a graph variant: FLOPs and cache memory as sympy expressions.

Why symbolic: a ratio measured on a tiny model says little about a 4k-token SD3 run; a
formula in the image-token count ``N``, the width ``d`` and the layer count ``L`` says how a
saving scales.  Each symbol replaces a size only where it evaluates back to that size,
so ``formula.subs(sizes.values())`` is exact for the traced model.

What is counted: matrix products only, 2 FLOPs per multiply-add -- the same ops
``torch.utils.flop_counter.FlopCounterMode`` counts, so the two can be compared:

* linear:    ``2 · rows · K · O``
* conv:      ``2 · B · positions · C_out · C_in/groups · kernel`` (output positions;
  input positions for transposed convs)
* attention: ``2 · B · H · Lq · Lk · (D + D_v)`` (``QKᵀ`` and ``AV``; softmax not counted)
* matmul, bmm, baddbmm, two-operand einsum: ``2 · |output| · contracted size``

Norms, activations and elementwise ops count zero (memory-bound, small next to the above).
Note: FlopCounterMode has no formula for CPU's fused attention kernel; count attention
with it under ``sdpa_kernel(SDPBackend.MATH)``, where attention is two counted ``bmm``.

Sizes become symbols by the *role* of a dimension in its op, never by value alone (the
tiny DiT has ``N = d = 16``): the first dimension of an activation is the batch ``B``;
the other leading dimensions of a linear's input, attention's ``Lq``/``Lk`` and a conv's
spatial positions are sequence lengths (``N``, the subset ``k``, text tokens ``T``,
``N+T``, ``k+T``, or ``N/4``-style pyramid levels of a UNet); weight and channel sizes
that are a small integer multiple of ``d`` become ``c·d`` (attention uses ``H·D``).
Anything else stays a number.  Repeated blocks with equal cost collapse to ``L·(…)``.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..passes import block_of, find_graph_inputs, module_path_of
from ..passes.graph_queries import is_attention, is_conv, is_linear, tensor_meta
from ..passes.residual_branches import CONTEXT_STREAM, IMAGE_STREAM, JOINT_STREAM, ResidualBranch


def _symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, positive=True, integer=True)


B, N, K_SUBSET, T, D = (_symbol(s) for s in ("B", "N", "k", "T", "d"))
_MAX_WIDTH_MULTIPLE = 12
_PYRAMID_FACTORS = (4, 16, 64)
_TRANSPOSED_CONV = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.baddbmm, torch.addmm,
                     torch.einsum}
_MATMUL_METHODS = {"matmul", "bmm", "mm", "__matmul__"}


@dataclass(frozen=True)
class ModelSizes:
    """The sizes a graph was traced at; each named size gets a symbol.

    ``layout`` is ``"tokens"`` for (B, sequence, width) activations (transformers) and
    ``"channels"`` for (B, width, H, W) (UNets), where ``tokens`` counts latent pixels
    at full resolution and lower pyramid levels become ``N/4``, ``N/16``...
    """

    batch: int | None = None
    tokens: int | None = None
    width: int | None = None
    text_tokens: int | None = None
    subset: int | None = None
    layout: str = "tokens"

    def values(self) -> dict[sympy.Symbol, int]:
        named = {B: self.batch, N: self.tokens, D: self.width, T: self.text_tokens, K_SUBSET: self.subset}
        return {s: v for s, v in named.items() if v is not None}

    def describe(self) -> str:
        return " ".join(f"{s}={v}" for s, v in self.values().items())

    # ---------------------------------------------------------------- roles
    def batch_dim(self, n: int) -> sympy.Expr:
        return B if n == self.batch else sympy.Integer(n)

    def sequence(self, n: int) -> sympy.Expr:
        if n <= 1:
            return sympy.Integer(n)
        candidates: list[tuple[sympy.Expr, int | None]] = [
            (N, self.tokens), (K_SUBSET, self.subset), (T, self.text_tokens)]
        if self.text_tokens is not None:
            candidates += [(N + T, _sum(self.tokens, self.text_tokens)),
                           (K_SUBSET + T, _sum(self.subset, self.text_tokens))]
        if self.layout == "channels" and self.tokens:
            candidates += [(N / r, self.tokens // r) for r in _PYRAMID_FACTORS if self.tokens % r == 0]
        for expr, value in candidates:
            if value == n:
                return expr
        return sympy.Integer(n)

    def channels(self, n: int) -> sympy.Expr:
        if self.width and n % self.width == 0 and 1 <= n // self.width <= _MAX_WIDTH_MULTIPLE:
            return (n // self.width) * D
        return sympy.Integer(n)

    def activation(self, shape: Sequence[int]) -> sympy.Expr:
        """Element count of a (B, seq..., width) or (B, width, H, W) tensor."""
        shape = [int(s) for s in shape]
        if not shape:
            return sympy.Integer(1)
        head = self.batch_dim(shape[0])
        if self.layout == "channels" and len(shape) >= 3:
            return head * self.channels(shape[1]) * self.sequence(math.prod(shape[2:]))
        if len(shape) == 1:
            return head
        middle = [self.sequence(s) for s in shape[1:-1]]
        return head * sympy.Mul(*middle) * self.channels(shape[-1])


def _sum(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def infer_sizes(gm: fx.GraphModule, branches: Sequence[ResidualBranch]) -> ModelSizes:
    """Batch, image tokens, width and text tokens, read off the residual branches' shapes.

    Text tokens come from a context-stream branch, a joint branch (minus the image
    tokens), or else the key length of a cross-attention.  Without branches only the
    batch is known and every other size stays a number.
    """
    image = [b for b in branches if b.stream == IMAGE_STREAM and b.shape]
    if not image:
        user = find_graph_inputs(gm).user_indices
        nodes = list(gm.graph.find_nodes(op="placeholder"))
        metas = [tensor_meta(nodes[i]) for i in user]
        batch = next((int(m.shape[0]) for m in metas if m is not None and m.dim() > 0), None)
        return ModelSizes(batch=batch)
    shape = image[0].shape
    if len(shape) >= 4:
        return ModelSizes(batch=shape[0], tokens=math.prod(shape[2:]), width=shape[1],
                          text_tokens=_cross_attention_keys(gm, branches), layout="channels")
    tokens = shape[1]
    context = [b.shape[1] for b in branches if b.stream == CONTEXT_STREAM and len(b.shape) == 3]
    joint = [b.shape[1] - tokens for b in branches if b.stream == JOINT_STREAM and len(b.shape) == 3]
    text = (context or [t for t in joint if t > 0] or [_cross_attention_keys(gm, branches)])[0]
    return ModelSizes(batch=shape[0], tokens=tokens, width=shape[-1], text_tokens=text)


def _cross_attention_keys(gm: fx.GraphModule, branches: Sequence[ResidualBranch]) -> int | None:
    names = {n for b in branches for n in b.attention_nodes}
    lengths = Counter()
    for node in gm.graph.nodes:
        if node.name in names:
            q, k, _ = attention_operands(node)
            if q is not None and k is not None and q.shape[-2] != k.shape[-2]:
                lengths[int(k.shape[-2])] += 1
    return lengths.most_common(1)[0][0] if lengths else None


# -------------------------------------------------------------------- per-op FLOPs
def _operand(node: fx.Node, index: int, name: str):
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name)
    return tensor_meta(value) if isinstance(value, fx.Node) else None


def attention_operands(node: fx.Node):
    """(query, key, value) example tensors of an sdpa node, given positionally or by name."""
    return tuple(_operand(node, i, n) for i, n in enumerate(("query", "key", "value")))


def _linear_flops(node: fx.Node, sizes: ModelSizes) -> sympy.Expr | None:
    x, w = _operand(node, 0, "input"), _operand(node, 1, "weight")
    if x is None or w is None or x.dim() < 1:
        return None
    lead = [int(s) for s in x.shape[:-1]]
    rows = sizes.batch_dim(lead[0]) * sizes.sequence(math.prod(lead[1:])) if lead else 1
    return 2 * rows * sizes.channels(int(w.shape[1])) * sizes.channels(int(w.shape[0]))


def _conv_flops(node: fx.Node, sizes: ModelSizes) -> sympy.Expr | None:
    x, w, out = _operand(node, 0, "input"), _operand(node, 1, "weight"), tensor_meta(node)
    if x is None or w is None or out is None:
        return None
    positions = (x if node.target in _TRANSPOSED_CONV else out).shape[2:]
    kernel = math.prod(int(s) for s in w.shape[2:])
    return (2 * sizes.batch_dim(int(x.shape[0])) * sizes.sequence(math.prod(positions))
            * sizes.channels(int(w.shape[0])) * sizes.channels(int(w.shape[1])) * kernel)


def _attention_flops(node: fx.Node, sizes: ModelSizes) -> sympy.Expr | None:
    q, k, v = attention_operands(node)
    if q is None or k is None or v is None:
        return None
    heads = math.prod(int(s) for s in q.shape[1:-2])
    batch = sizes.batch_dim(int(q.shape[0]))
    lq, lk = sizes.sequence(int(q.shape[-2])), sizes.sequence(int(k.shape[-2]))
    head_widths = sizes.channels(heads * int(q.shape[-1])) + sizes.channels(heads * int(v.shape[-1]))
    return 2 * batch * lq * lk * head_widths


def _matmul_flops(node: fx.Node, sizes: ModelSizes) -> sympy.Expr | None:
    """Generic products: symbolic in the batch only (their other dims have no known role)."""
    out = tensor_meta(node)
    if out is None:
        return None
    if node.target is torch.einsum:
        return _einsum_flops(node, sizes)
    first = 1 if node.target in (torch.baddbmm, torch.addmm) else 0
    a = _operand(node, first, "input" if first == 0 else "batch1")
    if a is None or a.dim() == 0:
        return None
    contracted = int(a.shape[-1])
    rest = [int(s) for s in out.shape]
    if not rest:
        return sympy.Integer(2 * contracted)
    return 2 * sizes.batch_dim(rest[0]) * math.prod(rest[1:]) * contracted


def _einsum_flops(node: fx.Node, sizes: ModelSizes) -> sympy.Expr | None:
    equation = node.args[0] if node.args and isinstance(node.args[0], str) else None
    operands = [tensor_meta(a) for a in node.args[1:] if isinstance(a, fx.Node)]
    if equation is None or len(operands) != 2 or "->" not in equation or "." in equation:
        return None  # permutations, traces and ellipses: not a product we model
    inputs, output = equation.replace(" ", "").split("->")
    letters: dict[str, int] = {}
    for spec, tensor in zip(inputs.split(","), operands):
        if tensor is None:
            return None
        letters.update({c: int(s) for c, s in zip(spec, tensor.shape)})
    if not set(letters) - set(output):
        return None  # no contraction: an elementwise product
    batch_letter = output[0] if output else ""
    head = sizes.batch_dim(letters[batch_letter]) if batch_letter else sympy.Integer(1)
    return 2 * head * math.prod(v for c, v in letters.items() if c != batch_letter)


def node_flops(node: fx.Node, sizes: ModelSizes) -> sympy.Expr | None:
    """Symbolic FLOPs of one node; None for nodes that do no counted work."""
    if is_linear(node):
        return _linear_flops(node, sizes)
    if is_conv(node):
        return _conv_flops(node, sizes)
    if is_attention(node):
        return _attention_flops(node, sizes)
    if (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (
            node.op == "call_method" and node.target in _MATMUL_METHODS):
        return _matmul_flops(node, sizes)
    return None


# -------------------------------------------------------------------- totals
def layer_symbol(group: str) -> sympy.Symbol:
    """``transformer_blocks`` -> ``L``; ``single_transformer_blocks`` -> ``L_single``."""
    name = group
    for suffix in ("transformer_blocks", "blocks", "layers"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = name.strip("_")
    return _symbol(f"L_{name}" if name else "L")


def _group_of(block: str) -> str | None:
    """``transformer_blocks.3`` -> ``transformer_blocks``; None for blocks that do not repeat
    at the top level (``proj_out``, ``mid_block``), which are summed as they are."""
    head, _, index = block.rpartition(".")
    return head if head and "." not in head and index.isdigit() else None


@dataclass(frozen=True)
class Cost:
    """A symbolic cost and the symbol values that evaluate it for the traced model."""

    expr: sympy.Expr
    values: dict

    @property
    def value(self) -> int:
        return int(self.expr.subs(self.values))


CostItem = tuple[str, str, sympy.Expr]
"""(block, what inside the block, cost): e.g. ``("transformer_blocks.0", "attn1.to_q/linear", 2*B*N*d**2)``."""


def total_by_block(items: Iterable[CostItem], sizes: ModelSizes) -> Cost:
    """Sum costs, writing the layers of a repeated block group as ``L·(one layer)``.

    The work all blocks of a group (``transformer_blocks.<i>``) do alike (same op at the
    same module-relative place, same cost) becomes ``L·common``; each block adds what it
    does beyond it.  DiT's block 0 also computes
    the output layer's conditioning, SD3's last block has no context MLP: both still fold.
    Groups whose common part is less than half of some block (UNet levels of different
    widths that happen to share a conv of equal cost) are summed as they are.
    """
    by_block: dict[str, list[tuple[str, sympy.Expr]]] = {}
    total = sympy.Integer(0)
    groups: dict[str, list[str]] = {}
    for block, key, expr in items:
        by_block.setdefault(block, []).append((key, expr))
        group = _group_of(block)
        if group is None:
            total += expr
        elif block not in groups.setdefault(group, []):
            groups[group].append(block)
    values = sizes.values()
    total = sympy.expand(total)
    for group, blocks in groups.items():
        block_totals = [sum((e for _, e in by_block[b]), sympy.Integer(0)) for b in blocks]
        common = _common_cost([by_block[b] for b in blocks]) if len(blocks) > 1 else None
        if common is None or any(2 * common.subs(values) < t.subs(values) for t in block_totals):
            total += sympy.expand(sum(block_totals, sympy.Integer(0)))
            continue
        layers = layer_symbol(group)
        values[layers] = len(blocks)
        total += layers * sympy.factor_terms(common) + sum(
            (sympy.expand(t - common) for t in block_totals), sympy.Integer(0))
    return Cost(total, values)


def _common_cost(blocks: list[list[tuple[str, sympy.Expr]]]) -> sympy.Expr | None:
    """Cost of the work (same op, same module-relative place, same cost) all blocks do."""
    shared = Counter((k, sympy.expand(e)) for k, e in blocks[0])
    for items in blocks[1:]:
        shared &= Counter((k, sympy.expand(e)) for k, e in items)
    common = sum((e * n for (_, e), n in shared.items()), sympy.Integer(0))
    return common if common != 0 else None


def _node_key(node: fx.Node, block: str) -> str:
    path = module_path_of(node)
    relative = path[len(block):].lstrip(".") if path.startswith(block) else path
    return f"{relative}/{getattr(node.target, '__name__', node.target)}"


def graph_flops(gm: fx.GraphModule, sizes: ModelSizes) -> Cost:
    """FLOPs of running ``gm`` once, as a symbolic total folded by repeated blocks."""
    items = []
    for node in gm.graph.nodes:
        flops = node_flops(node, sizes)
        if flops is not None:
            block = block_of(module_path_of(node))
            items.append((block, _node_key(node, block), flops))
    return total_by_block(items, sizes)


def nodes_flops(nodes: Iterable[fx.Node], sizes: ModelSizes) -> sympy.Expr:
    """Plain sum of FLOPs of some nodes (e.g. one branch body)."""
    total = sympy.Integer(0)
    for node in nodes:
        flops = node_flops(node, sizes)
        if flops is not None:
            total += flops
    return sympy.factor_terms(total)


def cache_bytes(buffers: Iterable[tuple[str, str, Sequence[int], torch.dtype]], sizes: ModelSizes) -> Cost:
    """Memory of runtime-owned caches, given as (block, what, shape, dtype) each."""
    items = [(block, key, sizes.activation(shape) * torch.empty((), dtype=dtype).element_size())
             for block, key, shape, dtype in buffers]
    return total_by_block(items, sizes)


def format_count(value: float, unit: str = "") -> str:
    """``1234567 -> '1.23 M'``: tables stay readable from tiny to full-size models."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()
