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
* attention: ``2 · B · H · Lq · Lk · (D + D_v)`` (``QKᵀ`` and ``AV``; softmax not counted);
  importance scoring (``token_ops.attention_received``): ``QKᵀ`` only
* matmul, bmm, baddbmm, two-operand einsum: ``2 · |output| · contracted size``

Norms, activations and elementwise ops count zero (memory-bound, small next to the above).
Note: FlopCounterMode has no formula for CPU's fused attention kernel; count attention
with it under ``sdpa_kernel(SDPBackend.MATH)``, where attention is two counted ``bmm``.
Any other node FlopCounterMode sees doing matrix work (a new helper a rewrite inserts)
is costed by that measurement and listed as *unmodelled*, so totals are never silently
short.  Variants are costed on shapes from a fresh fake-tensor run, not the traced ones.

Sizes become symbols by the *role* of a dimension in its op, never by value alone (the
tiny DiT has ``N = d = 16``): the first dimension of an activation is the batch ``B``;
the other leading dimensions of a linear's input, attention's ``Lq``/``Lk`` and a conv's
spatial positions are sequence lengths (``N``, the subset ``k``, text tokens ``T``,
``N+T``, ``k+T``, or ``N/4``-style pyramid levels of a UNet); weight and channel sizes
that are a small integer multiple of ``d`` become ``c·d`` (attention uses ``H·D``).
Anything else stays a number.  Repeated blocks with equal cost collapse to ``L·(…)``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..passes import block_of, find_graph_inputs, module_path_of, token_ops
from ..passes.graph_queries import is_attention, is_conv, is_linear, tensor_meta
from ..passes.residual_branches import CONTEXT_STREAM, IMAGE_STREAM, JOINT_STREAM, ResidualBranch


def _symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, positive=True, integer=True)


B, N, K_SUBSET, T, D = (_symbol(s) for s in ("B", "N", "k", "T", "d"))
_MAX_WIDTH_MULTIPLE = 12
_PYRAMID_FACTORS = (4, 16, 64)
_TRANSPOSED_CONV = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.baddbmm, torch.addmm}
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
        """A sequence length; the model's own sizes win over the subset k when they coincide."""
        if n <= 1:
            return sympy.Integer(n)
        candidates: list[tuple[sympy.Expr, int | None]] = [
            (N, self.tokens), (T, self.text_tokens), (N + T, _sum(self.tokens, self.text_tokens)),
            (K_SUBSET, self.subset), (K_SUBSET + T, _sum(self.subset, self.text_tokens))]
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
        """Element count of a buffer: (B, width, H, W) in the channels layout; otherwise
        (B, ..., width) whose inner dims that are sequence lengths count as such and the
        rest (heads, head dim, width) multiply into channels -- (B, H, N+T, D) is
        ``B·(N+T)·d``.  A (B, X) buffer is a per-token one (scores, masks, indices)."""
        shape = [int(s) for s in shape]
        if not shape:
            return sympy.Integer(1)
        head = self.batch_dim(shape[0])
        if self.layout == "channels" and len(shape) >= 3:
            return head * self.channels(shape[1]) * self.sequence(math.prod(shape[2:]))
        if len(shape) <= 2:
            return head * sympy.Mul(*(self.sequence(s) for s in shape[1:]))
        inner = [self.sequence(s) for s in shape[1:-1]]
        sequences = [e for e in inner if not e.is_Integer]
        rest = math.prod(s for s, e in zip(shape[1:-1], inner) if e.is_Integer) * shape[-1]
        return head * sympy.Mul(*sequences) * self.channels(rest)


def _sum(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def infer_sizes(gm: fx.GraphModule, branches: Sequence[ResidualBranch], subset: int | None = None) -> ModelSizes:
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
        return ModelSizes(batch=batch, subset=subset)
    shape = image[0].shape
    if len(shape) >= 4:
        return ModelSizes(batch=shape[0], tokens=math.prod(shape[2:]), width=shape[1],
                          text_tokens=_cross_attention_keys(gm, branches), subset=subset, layout="channels")
    tokens = shape[1]
    context = [b.shape[1] for b in branches if b.stream == CONTEXT_STREAM and len(b.shape) == 3]
    joint = [b.shape[1] - tokens for b in branches if b.stream == JOINT_STREAM and len(b.shape) == 3]
    text = (context or [t for t in joint if t > 0] or [_cross_attention_keys(gm, branches)])[0]
    return ModelSizes(batch=shape[0], tokens=tokens, width=shape[-1], text_tokens=text, subset=subset)


def _cross_attention_keys(gm: fx.GraphModule, branches: Sequence[ResidualBranch]) -> int | None:
    names = {n for b in branches for n in b.attention_nodes}
    lengths = Counter()
    for node in gm.graph.nodes:
        if node.name in names:
            q, k, _ = attention_operands(node)
            if q is not None and k is not None and q.shape[-2] != k.shape[-2]:
                lengths[int(k.shape[-2])] += 1
    return lengths.most_common(1)[0][0] if lengths else None


# -------------------------------------------------------------------- shapes
def attention_operands(node: fx.Node, value_of: Callable[[Any], Any] = tensor_meta):
    """(query, key, value) tensors of an sdpa-like node, given positionally or by name."""
    return tuple(_operand(node, i, n, value_of) for i, n in enumerate(("query", "key", "value")))


def _operand(node: fx.Node, index: int, name: str, value_of: Callable[[Any], Any]):
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name)
    return value_of(value) if isinstance(value, fx.Node) else None


@dataclass(frozen=True)
class PropagatedShapes:
    """Tensors (fake) each node of a variant produces, and FLOPs measured per node.

    A rewrite changes shapes without updating the traced metadata (a partial variant's
    attention runs on k queries while its ``example_value`` still says N), so variant
    costs are read from a fresh fake-tensor run.  ``measured`` holds FlopCounterMode's
    count per node; it is used only for nodes no symbolic rule covers.
    """

    values: dict[str, torch.Tensor]
    measured: dict[str, int]

    def value_of(self, node: Any):
        value = self.values.get(node.name) if isinstance(node, fx.Node) else None
        return value if isinstance(value, torch.Tensor) else None


def propagate_shapes(gm: fx.GraphModule, buffers: Iterable[Any] = ()) -> PropagatedShapes:
    """Run ``gm`` on fake tensors built from its placeholders' traced metadata, or from
    ``buffers`` (objects with ``name``, ``shape``, ``dtype``, as a ``BufferSpec``) for added inputs."""
    from ..passes.fake_run import FakeRun

    specs = {b.name: b for b in buffers}
    runner = FakeRun(gm, count_flops=True)
    inputs = []
    with runner.mode:
        for node in gm.graph.find_nodes(op="placeholder"):
            traced = tensor_meta(node)
            spec = specs.get(node.name)
            if traced is not None:
                inputs.append(torch.empty_strided(traced.shape, traced.stride(), dtype=traced.dtype,
                                                  device=traced.device))
            elif spec is not None:
                inputs.append(torch.zeros(spec.shape, dtype=spec.dtype, device=getattr(spec, "device", "cpu")))
            else:
                raise ValueError(f"input {node.name!r} has neither traced metadata nor a buffer spec")
    runner.run_fake(inputs, convert=False)
    values, measured = runner.values, runner.flops
    return PropagatedShapes(values, measured)


# -------------------------------------------------------------------- per-op FLOPs
class FlopModel:
    """Symbolic FLOPs per node, from its operands' shapes.

    Shapes come from the traced metadata, or from :func:`propagate_shapes` for a variant.
    A node no rule covers but FlopCounterMode measured as doing matrix work counts as that
    number, and its target is listed in ``unmodelled`` so a report can say so.
    """

    def __init__(self, sizes: ModelSizes, shapes: PropagatedShapes | None = None) -> None:
        self.sizes = sizes
        self.shapes = shapes
        self.value_of = shapes.value_of if shapes is not None else tensor_meta
        self.unmodelled: Counter[str] = Counter()

    def operand(self, node: fx.Node, index: int, name: str):
        return _operand(node, index, name, self.value_of)

    def __call__(self, node: fx.Node) -> sympy.Expr | None:
        if node.op not in ("call_function", "call_method"):
            return None
        if is_linear(node):
            flops = self.linear(node)
        elif is_conv(node):
            flops = self.conv(node)
        elif is_attention(node):
            flops = self.attention(node, value_products=True)
        elif node.op == "call_function" and node.target is token_ops.attention_received:
            flops = self.attention(node, value_products=False)  # softmax(QKᵀ) only
            stride = node.args[5] if len(node.args) > 5 else node.kwargs.get("query_stride", 1)
            if flops is not None and isinstance(stride, int) and stride > 1:
                flops = flops / stride  # one query in every ``stride`` (token_ops.query_sample)
        elif node.op == "call_function" and node.target is torch.einsum:
            flops = self.einsum(node)
        elif (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (
                node.op == "call_method" and node.target in _MATMUL_METHODS):
            flops = self.matmul(node)
        else:
            flops = None
        measured = self.shapes.measured.get(node.name, 0) if self.shapes is not None else 0
        if flops is None and measured:
            self.unmodelled[getattr(node.target, "__name__", str(node.target))] += 1
            return sympy.Integer(measured)
        return flops

    def linear(self, node: fx.Node) -> sympy.Expr | None:
        x, w = self.operand(node, 0, "input"), self.operand(node, 1, "weight")
        if x is None or w is None or x.dim() < 1:
            return None
        lead = [int(s) for s in x.shape[:-1]]
        sizes = self.sizes
        rows = sizes.batch_dim(lead[0]) * sizes.sequence(math.prod(lead[1:])) if lead else 1
        return 2 * rows * sizes.channels(int(w.shape[1])) * sizes.channels(int(w.shape[0]))

    def conv(self, node: fx.Node) -> sympy.Expr | None:
        x, w, out = self.operand(node, 0, "input"), self.operand(node, 1, "weight"), self.value_of(node)
        if x is None or w is None or out is None:
            return None
        positions = (x if node.target in _TRANSPOSED_CONV else out).shape[2:]
        kernel = math.prod(int(s) for s in w.shape[2:])
        sizes = self.sizes
        return (2 * sizes.batch_dim(int(x.shape[0])) * sizes.sequence(math.prod(positions))
                * sizes.channels(int(w.shape[0])) * sizes.channels(int(w.shape[1])) * kernel)

    def attention(self, node: fx.Node, value_products: bool) -> sympy.Expr | None:
        q, k, v = attention_operands(node, self.value_of)
        if q is None or k is None or (value_products and v is None):
            return None
        heads = math.prod(int(s) for s in q.shape[1:-2])
        sizes = self.sizes
        lq, lk = sizes.sequence(int(q.shape[-2])), sizes.sequence(int(k.shape[-2]))
        widths = sizes.channels(heads * int(q.shape[-1]))
        if value_products:
            widths += sizes.channels(heads * int(v.shape[-1]))
        return 2 * sizes.batch_dim(int(q.shape[0])) * lq * lk * widths

    def matmul(self, node: fx.Node) -> sympy.Expr | None:
        """Generic products: symbolic in the batch only (their other dims have no known role)."""
        out = self.value_of(node)
        first = 1 if node.target in (torch.baddbmm, torch.addmm) else 0
        a = self.operand(node, first, "input" if first == 0 else "batch1")
        if out is None or a is None or a.dim() == 0:
            return None
        rest = [int(s) for s in out.shape]
        head = self.sizes.batch_dim(rest[0]) * math.prod(rest[1:]) if rest else 1
        return 2 * head * int(a.shape[-1])

    def einsum(self, node: fx.Node) -> sympy.Expr | None:
        equation = node.args[0] if node.args and isinstance(node.args[0], str) else None
        operands = [self.value_of(a) for a in node.args[1:] if isinstance(a, fx.Node)]
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
        head = self.sizes.batch_dim(letters[batch_letter]) if batch_letter else 1
        return 2 * head * math.prod(v for c, v in letters.items() if c != batch_letter)


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
    unmodelled: dict = field(default_factory=dict)   # op -> count, costed by measurement only

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


def graph_flops(gm: fx.GraphModule, sizes: ModelSizes, shapes: PropagatedShapes | None = None) -> Cost:
    """FLOPs of running ``gm`` once, as a symbolic total folded by repeated blocks."""
    model = FlopModel(sizes, shapes)
    items = []
    for node in gm.graph.nodes:
        flops = model(node)
        if flops is not None:
            block = block_of(module_path_of(node))
            items.append((block, _node_key(node, block), flops))
    return dataclasses.replace(total_by_block(items, sizes), unmodelled=dict(model.unmodelled))


def nodes_flops(nodes: Iterable[fx.Node], sizes: ModelSizes) -> sympy.Expr:
    """Plain sum of FLOPs of some nodes of a traced graph (e.g. one branch body)."""
    model = FlopModel(sizes)
    return sympy.factor_terms(sum((f for f in map(model, nodes) if f is not None), sympy.Integer(0)))


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
