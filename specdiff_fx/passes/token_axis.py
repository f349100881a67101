"""Token-axis analysis: follow the image-token axis from the patch embedding to the exit.

For partial compute, only a subset of k image tokens flows through the transformer
blocks.  This pass finds, for every node between the *entry* (the image residual stream
entering the first block) and the *exit* (the image stream after the last block):

* which dimension carries tokens and how that axis is laid out in *segments*
  (``image`` of size N, ``text`` of constant size T, in their concatenation order);
* constants in the graph that are functions of N (view/reshape extents, joint-sequence
  slice bounds, split sizes), as sympy expressions in the symbol ``N``, so a variant
  for k tokens substitutes ``N -> k``;
* the attention sites with their query/key/value nodes and layouts;
* position tensors (RoPE tables) that meet token tensors and must be gathered.

Token positions are tracked structurally (by axis index), never by matching sizes, so a
width that happens to equal N cannot be mistaken for the token axis.  Any op that mixes
tokens in a way this pass does not model raises :class:`TokenAxisError`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_queries import ancestors, descendants, tensor_meta
from .residual_branches import CONTEXT_STREAM, IMAGE_STREAM, ResidualBranch, find_residual_branches

N = sympy.Symbol("N", positive=True, integer=True)
IMAGE = "image"
TEXT = "text"


class TokenAxisError(Exception):
    """The graph mixes tokens in a way partial compute cannot reproduce exactly."""


@dataclass(frozen=True)
class TokenAxis:
    axis: int
    segments: tuple[tuple[str, Any], ...]   # ((kind, sympy size), ...) in sequence order

    @property
    def size(self) -> sympy.Expr:
        return sympy.Add(*[s for _, s in self.segments])

    def concrete(self, n: int) -> int:
        return int(self.size.subs(N, n))

    def boundaries(self, n: int) -> list[int]:
        out, acc = [0], 0
        for _, s in self.segments:
            acc += int(sympy.sympify(s).subs(N, n))
            out.append(acc)
        return out

    @property
    def has_image(self) -> bool:
        return any(kind == IMAGE for kind, _ in self.segments)

    def with_axis(self, axis: int) -> "TokenAxis":
        return TokenAxis(axis, self.segments)


@dataclass(frozen=True)
class AttentionSite:
    node: str
    query: str
    key: str
    value: str
    query_layout: TokenAxis
    key_layout: TokenAxis | None      # None: keys carry no image token (cross-attention)
    scale: float | None


@dataclass
class TokenRegion:
    entry: str
    exit: str
    num_tokens: int
    axes: dict[str, TokenAxis]
    sites: list[AttentionSite]
    # (consumer node, argument index, operand's token axis, consumer layout)
    position_operands: list[tuple[str, int | str, int, TokenAxis]]  # int: args index, str: kwarg
    # node -> (args, kwargs) templates with sympy expressions in N where constants depend on N
    templates: dict[str, tuple[Any, Any]]
    region: list[str] = field(default_factory=list)
    branches: list[ResidualBranch] = field(default_factory=list)


# ------------------------------------------------------------------------------ arguments
_MISSING = object()


def arg(node: fx.Node, index: int, name: str, default: Any = _MISSING) -> Any:
    """The argument at ``index`` or keyword ``name`` of ``node``: the one accessor every
    rule uses, so positional-or-keyword spellings never need hand-written lookups."""
    if len(node.args) > index:
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    if default is _MISSING:
        raise TokenAxisError(f"argument {name!r} missing")
    return default


def with_arg(node: fx.Node, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of ``node`` with the argument at ``index`` / ``name`` replaced."""
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) > index:
        args[index] = value
    else:
        kwargs[name] = value
    return tuple(args), kwargs


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _shape_args(node: fx.Node) -> tuple[list, int]:
    """The target-shape argument of view/reshape/expand and where it starts in ``args``."""
    args = list(node.args[1:])
    if not args and "shape" in node.kwargs:
        return list(node.kwargs["shape"]), -1
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return list(args[0]), -1
    return args, 1


# ------------------------------------------------------------------------------ the rule table
Rule = Callable[["_Propagator", fx.Node, list], Any]
RULES: dict[tuple[str, Any], Rule] = {}
"""``(node.op, target) -> rule``.  A rule reads the token layouts of a node's inputs
(``p.axes``) and returns the layout of its output (a :class:`TokenAxis`, a list of them for
tuple outputs, or None when the output carries no token); it records how the node is
re-evaluated at k (``p.template``: constants in N), which broadcast operands are gathered
(``p.positions``) and where attention is (``p.sites``), and raises :class:`TokenAxisError`
for anything it cannot reproduce exactly.  Adding an op is one :func:`register` call."""


def register(*targets: Any, methods: tuple[str, ...] = ()) -> Callable[[Rule], Rule]:
    """Register a rule for ``call_function`` ``targets`` and ``call_method`` ``methods``."""
    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[("call_function", t)] = fn
        for m in methods:
            RULES[("call_method", m)] = fn
        return fn
    return deco


def rule_for(node: fx.Node) -> Rule | None:
    try:
        return RULES.get((node.op, node.target))
    except TypeError:  # unhashable target
        return None


class _Propagator:
    def __init__(self, gm: fx.GraphModule, n0: int):
        self.gm = gm
        self.n0 = n0
        self.axes: dict[fx.Node, TokenAxis] = {}
        self.tuples: dict[fx.Node, list[TokenAxis | None]] = {}
        self.sites: list[AttentionSite] = []
        self.positions: list[tuple[str, int | str, int, TokenAxis]] = []
        self.templates: dict[str, tuple[Any, Any]] = {}
        self.errors: dict[fx.Node, str] = {}

    # -- helpers -------------------------------------------------------------------
    def expr_for(self, value: int, layout: TokenAxis) -> Any:
        if value != layout.concrete(self.n0):
            raise TokenAxisError(f"constant {value} on the token axis is not its extent")
        return layout.size

    def template(self, node: fx.Node, args=None, kwargs=None):
        self.templates[node.name] = (args if args is not None else node.args,
                                     kwargs if kwargs is not None else dict(node.kwargs))

    def check(self, node: fx.Node, layout: TokenAxis) -> TokenAxis:
        meta = tensor_meta(node)
        if meta is None:
            raise TokenAxisError("no tensor metadata")
        if layout.axis >= meta.dim() or meta.shape[layout.axis] != layout.concrete(self.n0):
            raise TokenAxisError(f"token axis {layout.axis} not found in output shape {tuple(meta.shape)}")
        return layout

    def layout(self, node: Any) -> TokenAxis:
        if node not in self.axes:
            raise TokenAxisError(f"{getattr(node, 'name', node)} carries no token layout here")
        return self.axes[node]

    def visit(self, node: fx.Node) -> None:
        token_inputs = [a for a in node.all_input_nodes if a in self.axes or a in self.tuples]
        if not token_inputs:
            return
        try:
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.tuples:
                result = self.tuples[node.args[0]][node.args[1]]
            else:
                rule = rule_for(node)
                if rule is None:
                    raise TokenAxisError("op not modelled for partial token compute")
                result = rule(self, node, token_inputs)
        except TokenAxisError as exc:
            self.errors[node] = f"{node.format_node()}: {exc}"
            return
        if isinstance(result, list):
            self.tuples[node] = result
        elif result is not None:
            self.axes[node] = result


# ------------------------------------------------------------------------------ rules
_REDUCTION_METHODS = ("mean", "sum", "softmax")
_NORMS = (F.layer_norm, F.rms_norm, torch.layer_norm, torch.rms_norm)


@register(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.exp,
    torch.tanh, torch.sigmoid, torch.abs, torch.where, torch.clamp, torch.clip, torch.cos, torch.sin,
    F.gelu, F.silu, F.relu, F.dropout, F.sigmoid, F.tanh, F.mish, F.softmax, *_NORMS,
    torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like,
    methods=("to", "float", "half", "bfloat16", "double", "type", "contiguous", "clone",
             "add", "sub", "mul", "div", "pow", "neg", "rsqrt", "sigmoid", "tanh", "exp", "abs",
             "__add__", "__mul__", "__sub__", "__truediv__", "__rmul__", "__radd__", "float_power",
             "cos", "sin", "clamp", "clip", *_REDUCTION_METHODS),
)
def elementwise(p: _Propagator, node: fx.Node, token_inputs: list[fx.Node]):
    """Token-wise ops (and reductions/norms over other axes): the subset simply flows
    through; operands broadcast along the token axis (RoPE tables) are gathered."""
    meta = tensor_meta(node)
    if meta is None:
        raise TokenAxisError("no tensor metadata")
    layouts = {p.axes[a].with_axis(p.axes[a].axis + meta.dim() - tensor_meta(a).dim()) for a in token_inputs}
    if len(layouts) != 1:
        raise TokenAxisError("token operands with different layouts")
    layout = layouts.pop()
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in _REDUCTION_METHODS or node.target is F.softmax:
        dims = arg(node, 1, "dim", None)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        src = tensor_meta(token_inputs[0]).dim()
        if not dims or any(_norm_dim(d, src) == p.axes[token_inputs[0]].axis for d in dims):
            raise TokenAxisError("reduction over the token axis")
    if node.target in _NORMS:
        if len(arg(node, 1, "normalized_shape")) > meta.dim() - 1 - layout.axis:
            raise TokenAxisError("normalisation over the token axis")
    for i, a in enumerate(node.args):
        if layout.has_image and isinstance(a, fx.Node) and a not in p.axes:
            other = tensor_meta(a)
            if other is None:
                continue
            j = layout.axis - (meta.dim() - other.dim())
            if 0 <= j < other.dim() and other.shape[j] != 1:
                if other.shape[j] != layout.concrete(p.n0):
                    raise TokenAxisError("operand broadcast along tokens with another extent")
                p.positions.append((node.name, i, j, layout))
    return p.check(node, layout)


@register(methods=("type_as",))
def type_as(p: _Propagator, node: fx.Node, token_inputs):
    """``x.type_as(y)`` reads only y's dtype: the layout is x's (or none)."""
    return p.check(node, p.axes[node.args[0]]) if node.args[0] in p.axes else None


@register(F.group_norm)
def mixes_tokens(p: _Propagator, node: fx.Node, token_inputs):
    raise TokenAxisError(f"{getattr(node.target, '__name__', node.target)} mixes tokens")


@register(F.linear, torch._C._nn.linear)
def linear(p: _Propagator, node: fx.Node, token_inputs):
    layout = p.layout(node.args[0])
    if layout.axis == tensor_meta(node.args[0]).dim() - 1:
        raise TokenAxisError("linear over the token axis")
    return p.check(node, layout)


@register(torch.reshape, methods=("view", "reshape", "expand"))
def reshape(p: _Propagator, node: fx.Node, token_inputs):
    """Token axis found by element counts; its extent, if written as a constant, becomes
    an expression in N."""
    layout = p.layout(node.args[0])
    src = tuple(tensor_meta(node.args[0]).shape)
    out = tuple(tensor_meta(node).shape)
    before = math.prod(src[: layout.axis])
    upto = before * src[layout.axis]
    j = next((j for j in range(len(out))
              if math.prod(out[:j]) == before and math.prod(out[: j + 1]) == upto), None)
    if j is None:
        raise TokenAxisError(f"reshape {src} -> {out} merges or splits the token axis")
    shape, start = _shape_args(node)
    if j < len(shape) and isinstance(shape[j], int) and shape[j] != -1:
        shape = list(shape)
        shape[j] = p.expr_for(shape[j], layout)
        if start == -1:
            p.template(node, *with_arg(node, 1, "shape", tuple(shape)))
        else:
            p.template(node, (node.args[0], *shape))
    elif j < len(shape) and not isinstance(shape[j], int):
        raise TokenAxisError("symbolic reshape extent on the token axis")
    return p.check(node, layout.with_axis(j))


@register(torch.transpose, methods=("transpose", "swapaxes"))
def transpose(p: _Propagator, node: fx.Node, token_inputs):
    layout = p.layout(node.args[0])
    nd = tensor_meta(node).dim()
    a, b = (_norm_dim(d, nd) for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1")))
    axis = b if layout.axis == a else a if layout.axis == b else layout.axis
    return p.check(node, layout.with_axis(axis))


@register(torch.permute, methods=("permute",))
def permute(p: _Propagator, node: fx.Node, token_inputs):
    layout = p.layout(node.args[0])
    dims = arg(node, 1, "dims") if len(node.args) <= 2 else node.args[1:]
    dims = dims if isinstance(dims, (tuple, list)) else node.args[1:]
    nd = tensor_meta(node).dim()
    dims = [_norm_dim(d, nd) for d in dims]
    return p.check(node, layout.with_axis(dims.index(layout.axis)))


@register(torch.unsqueeze, methods=("unsqueeze",))
def unsqueeze(p: _Propagator, node: fx.Node, token_inputs):
    layout = p.layout(node.args[0])
    d = _norm_dim(arg(node, 1, "dim"), tensor_meta(node).dim())
    return p.check(node, layout.with_axis(layout.axis + (1 if d <= layout.axis else 0)))


@register(torch.squeeze, methods=("squeeze",))
def squeeze(p: _Propagator, node: fx.Node, token_inputs):
    layout = p.layout(node.args[0])
    src = tensor_meta(node.args[0])
    dims = node.args[1:] or ([node.kwargs["dim"]] if "dim" in node.kwargs else list(range(src.dim())))
    dims = [_norm_dim(d, src.dim()) for d in (dims[0] if isinstance(dims[0], (tuple, list)) else dims)]
    removed = [d for d in dims if src.shape[d] == 1 and d != layout.axis]
    # squeezing the token axis itself is a no-op while the subset keeps >= 2 tokens
    return p.check(node, layout.with_axis(layout.axis - sum(d < layout.axis for d in removed)))


@register(torch.flatten, methods=("flatten",))
def flatten(p: _Propagator, node: fx.Node, token_inputs):
    layout = p.layout(node.args[0])
    src = tensor_meta(node.args[0]).dim()
    start = _norm_dim(arg(node, 1, "start_dim", 0), src)
    end = _norm_dim(arg(node, 2, "end_dim", -1), src)
    if start <= layout.axis <= end and start != end:
        raise TokenAxisError("flatten merges the token axis")
    axis = layout.axis - (end - start) if layout.axis > end else layout.axis
    return p.check(node, layout.with_axis(axis))


@register(torch.unflatten, methods=("unflatten",))
def unflatten(p: _Propagator, node: fx.Node, token_inputs):
    layout = p.layout(node.args[0])
    src = tensor_meta(node.args[0]).dim()
    d = _norm_dim(arg(node, 1, "dim"), src)
    if d == layout.axis:
        raise TokenAxisError("unflatten of the token axis")
    axis = layout.axis + (len(arg(node, 2, "sizes")) - 1 if d < layout.axis else 0)
    return p.check(node, layout.with_axis(axis))


@register(torch.view_as_complex)
def view_as_complex(p: _Propagator, node: fx.Node, token_inputs):
    """Complex RoPE: the trailing (re, im) pair becomes one complex element."""
    layout = p.layout(node.args[0])
    if layout.axis == tensor_meta(node.args[0]).dim() - 1:
        raise TokenAxisError("view_as_complex of the token axis")
    return p.check(node, layout)


@register(torch.view_as_real)
def view_as_real(p: _Propagator, node: fx.Node, token_inputs):
    return p.check(node, p.layout(node.args[0]))


@register(torch.unbind, methods=("unbind",))
def unbind(p: _Propagator, node: fx.Node, token_inputs):
    layout = p.layout(node.args[0])
    src = tensor_meta(node.args[0])
    d = _norm_dim(arg(node, 1, "dim", 0), src.dim())
    if d == layout.axis:
        raise TokenAxisError("unbind over the token axis")
    return [layout.with_axis(layout.axis - (1 if d < layout.axis else 0))] * src.shape[d]


@register(torch.split, torch.chunk, methods=("chunk", "split", "split_with_sizes"))
def split(p: _Propagator, node: fx.Node, token_inputs):
    """Splits across other axes keep the layout; a split of the token axis at segment
    boundaries (joint text|image) yields the segments, with sizes in N."""
    layout = p.layout(node.args[0])
    src = tensor_meta(node.args[0])
    name = node.target if isinstance(node.target, str) else node.target.__name__
    size_name = "chunks" if name == "chunk" else "split_size_or_sections" if node.op == "call_function" \
        else "split_size" if name == "split" else "split_sizes"
    size_arg = arg(node, 1, size_name)
    d = _norm_dim(arg(node, 2, "dim", 0), src.dim())
    if d != layout.axis:
        if name == "chunk":
            return [layout] * int(size_arg)
        count = len(size_arg) if isinstance(size_arg, (list, tuple)) else math.ceil(src.shape[d] / size_arg)
        return [layout] * count
    if name == "chunk" or not isinstance(size_arg, (list, tuple)):
        raise TokenAxisError("equal-size split of the token axis")
    bounds = layout.boundaries(p.n0)
    pieces, exprs, pos = [], [], 0
    for size in size_arg:
        start, stop = pos, pos + size
        if start not in bounds or stop not in bounds:
            raise TokenAxisError("split of the token axis inside a segment")
        segs = layout.segments[bounds.index(start): bounds.index(stop)]
        pieces.append(TokenAxis(layout.axis, segs))
        exprs.append(sympy.Add(*[s for _, s in segs]))
        pos = stop
    p.template(node, *with_arg(node, 1, size_name, exprs))
    return pieces


def _index_layout(p: _Propagator, layout: TokenAxis, ndim: int, index: Any):
    """Layout of ``x[index]`` for ``x`` of ``ndim`` dims, and the index with token-axis
    slice bounds as expressions in N."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) for i in index):
        raise TokenAxisError("tensor indexing on a token tensor")
    if Ellipsis in index:
        k = index.index(Ellipsis)
        used = sum(1 for i in index if i is not None and i is not Ellipsis)
        index = index[:k] + (slice(None),) * (ndim - used) + index[k + 1:]
    in_dim, out_dim, axis, new_index, layout_out = 0, 0, None, list(index), layout
    for pos, item in enumerate(index):
        if item is None:
            out_dim += 1
            continue
        if in_dim == layout.axis:
            if not isinstance(item, slice):
                raise TokenAxisError("integer index on the token axis")
            layout_out, new_index[pos] = _slice(p, item, layout)
            axis = out_dim
        if isinstance(item, slice):
            out_dim += 1
        in_dim += 1
    if axis is None:  # token axis not indexed explicitly: trailing dims map through
        axis = out_dim + (layout.axis - in_dim)
    return layout_out.with_axis(axis), tuple(new_index), tuple(new_index) != index


def _slice(p: _Propagator, item: slice, layout: TokenAxis):
    if item.step not in (None, 1):
        raise TokenAxisError("strided slice of the token axis")
    bounds = layout.boundaries(p.n0)
    total = bounds[-1]
    start = 0 if item.start is None else (item.start + total if item.start < 0 else item.start)
    stop = total if item.stop is None else (item.stop + total if item.stop < 0 else min(item.stop, total))
    if start not in bounds or stop not in bounds:
        raise TokenAxisError("slice of the token axis inside a segment")
    i, j = bounds.index(start), bounds.index(stop)
    segs = layout.segments[i:j]
    prefix = lambda m: sympy.Add(*[s for _, s in layout.segments[:m]])  # noqa: E731
    new = slice(None if item.start is None else prefix(i), None if item.stop is None else prefix(j), item.step)
    return TokenAxis(layout.axis, segs), new


@register(operator.getitem)
def getitem(p: _Propagator, node: fx.Node, token_inputs):
    """Basic indexing; slices of the token axis at segment boundaries take bounds in N."""
    layout = p.layout(node.args[0])
    out, index, changed = _index_layout(p, layout, tensor_meta(node.args[0]).dim(), node.args[1])
    if changed:
        p.template(node, (node.args[0], index))
    return p.check(node, out)


@register(operator.setitem)
def setitem(p: _Propagator, node: fx.Node, token_inputs):
    """``x[index] = value`` (RoPE written into ``empty_like`` halves, or into the image
    part of a joint query): the written region must carry the value's tokens one to one."""
    target, index, value = node.args
    layout = p.layout(target)
    region, new_index, changed = _index_layout(p, layout, tensor_meta(target).dim(), index)
    if isinstance(value, fx.Node) and value in p.axes:
        meta = tensor_meta(value)
        written = region.axis - (_region_ndim(tensor_meta(target).dim(), index) - meta.dim())
        if p.axes[value].segments != region.segments or p.axes[value].axis != written:
            raise TokenAxisError("written value's token layout differs from the written region's")
    elif isinstance(value, fx.Node) and tensor_meta(value) is not None:
        meta = tensor_meta(value)
        j = region.axis - (_region_ndim(tensor_meta(target).dim(), index) - meta.dim())
        if 0 <= j < meta.dim() and meta.shape[j] != 1:
            raise TokenAxisError("a non-token value written along the token axis")
    if changed:
        p.template(node, (target, new_index, value))
    return None


def _region_ndim(ndim: int, index: Any) -> int:
    index = index if isinstance(index, tuple) else (index,)
    ints = sum(1 for i in index if isinstance(i, int))
    nones = sum(1 for i in index if i is None)
    return ndim - ints + nones


@register(F.pad)
def pad(p: _Propagator, node: fx.Node, token_inputs):
    """Padding of other axes keeps the layout; padding the token axis adds tokens."""
    layout = p.layout(node.args[0])
    widths = arg(node, 1, "pad")
    ndim = tensor_meta(node.args[0]).dim()
    padded = {ndim - 1 - i // 2 for i, w in enumerate(widths) if w}
    if layout.axis in padded:
        raise TokenAxisError("padding of the token axis")
    return p.check(node, layout)


@register(torch.matmul, operator.matmul, methods=("matmul", "__matmul__"))
def matmul(p: _Propagator, node: fx.Node, token_inputs):
    """A batched matmul keeps a token axis of its left operand's rows; one that contracts
    the token axis is linear attention (Sana): it would need both operands completed from
    caches and an importance proxy, since it has no attention map."""
    a, b = node.args[0], node.args[1]
    a_meta, b_meta = tensor_meta(a), tensor_meta(b)
    if (a in p.axes and p.axes[a].axis == a_meta.dim() - 1) or (b in p.axes and p.axes[b].axis == b_meta.dim() - 2):
        raise TokenAxisError("linear attention: matmul contracts the token axis")
    if b in p.axes or a not in p.axes or p.axes[a].axis != a_meta.dim() - 2:
        raise TokenAxisError("matmul with tokens on the right operand")
    return p.check(node, p.axes[a])


@register(torch.cat, torch.concat, torch.stack)
def cat(p: _Propagator, node: fx.Node, token_inputs):
    """Concatenation along the token axis builds a joint layout (text segments of
    constant size); along other axes all operands must share one layout."""
    tensors = arg(node, 0, "tensors")
    meta = tensor_meta(node)
    stack = node.target is torch.stack
    d = _norm_dim(arg(node, 1, "dim", 0), meta.dim())
    token = [t for t in tensors if t in p.axes]
    axes = {p.axes[t].axis for t in token}
    if len(axes) != 1:
        raise TokenAxisError("concatenated token tensors disagree on the token axis")
    axis = axes.pop()
    if stack:
        if any(t not in p.axes for t in tensors) or len({p.axes[t] for t in token}) != 1:
            raise TokenAxisError("stack with non-token tensors")
        return p.check(node, p.axes[token[0]].with_axis(axis + (1 if d <= axis else 0)))
    if d != axis:
        if any(t not in p.axes for t in tensors) or len({p.axes[t].segments for t in token}) != 1:
            raise TokenAxisError("concatenation with a non-token tensor along another axis")
        return p.check(node, p.axes[token[0]])
    segments: list = []
    for t in tensors:
        if t in p.axes:
            segments.extend(p.axes[t].segments)
        else:
            segments.append((TEXT, sympy.Integer(int(tensor_meta(t).shape[d]))))
    return p.check(node, TokenAxis(axis, tuple(segments)))


@register(F.scaled_dot_product_attention)
def attention(p: _Propagator, node: fx.Node, token_inputs):
    """Queries are the subset; keys/values that carry image tokens are completed from
    the per-layer cache (so they keep the full layout), text-only keys/values (cross
    attention) need no cache.  A mask's key side therefore passes unchanged; its query
    side, if it has one, is gathered like a position table."""
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    mask = arg(node, 3, "attn_mask", None)
    if q not in p.axes:
        raise TokenAxisError("keys carry image tokens but queries do not")
    q_layout = p.axes[q]
    k_layout = p.axes.get(k)
    if (k_layout is None) != (v not in p.axes):
        raise TokenAxisError("keys and values with different token layouts")
    if k_layout is not None and k_layout.segments != p.axes[v].segments:
        raise TokenAxisError("keys and values with different token layouts")
    if isinstance(mask, fx.Node):
        if mask in p.axes:
            raise TokenAxisError("attention mask computed from token features")
        mmeta = tensor_meta(mask)
        if mmeta is None or mmeta.dim() < 2:
            raise TokenAxisError("attention mask without tensor metadata")
        q_extent = mmeta.shape[-2]
        if q_extent != 1:
            if q_extent != q_layout.concrete(p.n0) or q_layout.axis != tensor_meta(q).dim() - 2:
                raise TokenAxisError("query side of the attention mask does not match the queries")
            p.positions.append((node.name, 3 if len(node.args) > 3 else "attn_mask", mmeta.dim() - 2, q_layout))
        k_extent = tensor_meta(k).shape[-2]
        if mmeta.shape[-1] not in (1, k_extent):
            raise TokenAxisError("key side of the attention mask does not match the keys")
    elif mask is not None:
        raise TokenAxisError("attention mask of an unknown kind")
    p.sites.append(AttentionSite(
        node=node.name, query=q.name, key=k.name, value=v.name, query_layout=q_layout,
        key_layout=k_layout, scale=arg(node, 6, "scale", None),
    ))
    return p.check(node, q_layout)


def _dead_ended(branches: list[ResidualBranch], live: set[str]) -> set[str]:
    """Branches whose residual chain (add -> next branch's source) ends in an add the output
    never reads: the text stream of a dual-stream model that drops its text at the end
    (CogVideoX, Qwen-Image), even where its branches were labelled image-stream."""
    by_source = {b.source: b for b in branches}
    dead = set()
    for b in branches:
        end, seen = b, set()
        while end.add in by_source and end.add not in seen:
            seen.add(end.add)
            end = by_source[end.add]
        if end.add not in live:
            dead.add(b.name)
    return dead


def _entry_and_last(branches: list[ResidualBranch], order: dict[str, int],
                    live: set[str] | None = None) -> tuple[str, ResidualBranch]:
    dead = _dead_ended(branches, live) if live is not None else set()
    stream = [b for b in branches if b.stream != CONTEXT_STREAM and b.name not in dead]
    if not stream:
        raise TokenAxisError("no image-stream residual branches")
    first = min(stream, key=lambda b: order[b.source])
    last = max(stream, key=lambda b: order[b.add])
    if first.stream != IMAGE_STREAM:
        raise TokenAxisError("the first block does not start on the image stream")
    return first.source, last


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs whose values ``node`` reads (``x.type_as(y)`` reads only y's dtype)."""
    if node.op == "call_method" and node.target == "type_as":
        return [a for a in node.args[:1] if isinstance(a, fx.Node)]
    return node.all_input_nodes


def _with_writes(region: set[fx.Node], downstream: set[fx.Node]) -> set[fx.Node]:
    """Add in-place writes into region tensors (``x[i] = v``) and what they read: they
    have no users, so data flow alone never reaches them, yet they define what the region
    computes."""
    while True:
        writes = {n for n in downstream - region
                  if n.op == "call_function" and n.target is operator.setitem and n.args[0] in region}
        if not writes:
            return region
        region = region | writes | (downstream & ancestors(writes))


def analyze_token_axis(gm: fx.GraphModule, branches: list[ResidualBranch] | None = None) -> TokenRegion:
    """Token layout of the image-token region of ``gm``. Pure analysis."""
    branches = find_residual_branches(gm) if branches is None else branches
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    output = next(iter(gm.graph.find_nodes(op="output")))
    entry_name, last = _entry_and_last(branches, order, {n.name for n in ancestors([output])})
    entry = nodes[entry_name]
    meta = tensor_meta(entry)
    if meta is None or meta.dim() != 3:
        raise TokenAxisError(f"entry {entry_name} is not a (batch, tokens, width) sequence")
    n0 = int(meta.shape[1])
    prop = _Propagator(gm, n0)
    prop.axes[entry] = TokenAxis(1, ((IMAGE, N),))
    downstream = descendants([entry])
    for node in gm.graph.nodes:
        if node in downstream:
            prop.visit(node)

    last_add = nodes[last.add]
    if last.stream == IMAGE_STREAM:
        exit_node = last_add
    else:  # joint stream: the exit is where the image segment is split off
        candidates = [n for n in gm.graph.nodes if n in descendants([last_add]) and n in prop.axes
                      and prop.axes[n].segments == ((IMAGE, N),)]
        if not candidates:
            raise TokenAxisError("cannot find where the image tokens leave the joint stream")
        exit_node = candidates[0]
    region = _with_writes(({entry} | (downstream & ancestors([exit_node]))) | {exit_node}, downstream)
    errors = [msg for n, msg in prop.errors.items() if n in region]
    if errors:
        raise TokenAxisError("; ".join(errors[:3]))
    if prop.axes.get(exit_node) != TokenAxis(1, ((IMAGE, N),)):
        raise TokenAxisError("the exit is not a (batch, image tokens, width) sequence")
    after_exit = descendants([exit_node])
    output = next(iter(gm.graph.find_nodes(op="output")))
    live = ancestors([output])
    for n in downstream - region - after_exit:
        if n in live:
            raise TokenAxisError(f"{n.name} carries tokens to the output around the exit")
    for n in after_exit:
        if any(a in region and a is not exit_node for a in _value_inputs(n)):
            raise TokenAxisError(f"{n.name} reads the token region besides its exit")
    names_in_region = {n.name for n in region}
    return TokenRegion(
        entry=entry.name,
        exit=exit_node.name,
        num_tokens=n0,
        axes={n.name: a for n, a in prop.axes.items() if n in region},
        sites=[s for s in prop.sites if s.node in names_in_region],
        position_operands=[p for p in prop.positions if p[0] in names_in_region],
        templates={k: v for k, v in prop.templates.items() if k in names_in_region},
        region=[n.name for n in gm.graph.nodes if n in region],
        branches=branches,
    )
