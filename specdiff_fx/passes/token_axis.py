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
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_queries import ancestors, descendants, is_attention, is_linear, tensor_meta
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
    position_operands: list[tuple[str, int, int, TokenAxis]]
    # node -> (args, kwargs) templates with sympy expressions in N where constants depend on N
    templates: dict[str, tuple[Any, Any]]
    region: list[str] = field(default_factory=list)
    branches: list[ResidualBranch] = field(default_factory=list)


_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.exp,
    torch.tanh, torch.sigmoid, torch.abs, torch.where, torch.clamp,
    F.gelu, F.silu, F.relu, F.dropout, F.layer_norm, F.rms_norm, F.group_norm, F.sigmoid, F.tanh,
    torch.layer_norm, torch.rms_norm, 
    F.mish, F.softmax,
}
_ELEMENTWISE_METHODS = {
    "to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous", "clone",
    "add", "sub", "mul", "div", "pow", "neg", "rsqrt", "sigmoid", "tanh", "exp", "abs",
    "mean", "sum", "softmax", "__add__", "__mul__", "__sub__", "__truediv__", "float_power",
}
_REDUCTIONS = {"mean", "sum"}


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _shape_args(node: fx.Node) -> tuple[list, int]:
    """The target-shape argument of view/reshape/expand and where it starts in ``args``."""
    args = list(node.args[1:]) if node.op == "call_method" else list(node.args[1:])
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return list(args[0]), -1
    return args, 1


class _Propagator:
    def __init__(self, gm: fx.GraphModule, n0: int):
        self.gm = gm
        self.n0 = n0
        self.axes: dict[fx.Node, TokenAxis] = {}
        self.tuples: dict[fx.Node, list[TokenAxis | None]] = {}
        self.sites: list[AttentionSite] = []
        self.positions: list[tuple[str, int, int, TokenAxis]] = []
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

    def _check(self, node: fx.Node, layout: TokenAxis) -> TokenAxis:
        meta = tensor_meta(node)
        if meta is None:
            raise TokenAxisError("no tensor metadata")
        if layout.axis >= meta.dim() or meta.shape[layout.axis] != layout.concrete(self.n0):
            raise TokenAxisError(f"token axis {layout.axis} not found in output shape {tuple(meta.shape)}")
        return layout

    # -- rules -----------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        token_inputs = [a for a in node.all_input_nodes if a in self.axes or a in self.tuples]
        if not token_inputs:
            return
        try:
            result = self._rule(node, token_inputs)
        except TokenAxisError as exc:
            self.errors[node] = f"{node.format_node()}: {exc}"
            return
        if isinstance(result, list):
            self.tuples[node] = result
        elif result is not None:
            self.axes[node] = result

    def _rule(self, node: fx.Node, token_inputs: list[fx.Node]):
        target = node.target
        if node.op == "call_function" and target is operator.getitem and node.args[0] in self.tuples:
            return self.tuples[node.args[0]][node.args[1]]
        if is_attention(node):
            return self._attention(node)
        if is_linear(node):
            layout = self.axes[node.args[0]]
            if layout.axis == tensor_meta(node.args[0]).dim() - 1:
                raise TokenAxisError("linear over the token axis")
            return self._check(node, layout)
        if node.op == "call_function" and target in (torch.cat, torch.concat, torch.stack):
            return self._cat(node)
        if node.op == "call_function" and target is operator.getitem:
            return self._getitem(node)
        if node.op == "call_method" or node.op == "call_function":
            name = target if isinstance(target, str) else getattr(target, "__name__", "")
            if node.op == "call_method" and name in ("view", "reshape", "expand") or target is torch.reshape:
                return self._reshape(node)
            if name in ("transpose", "swapaxes"):
                return self._transpose(node)
            if name == "permute":
                return self._permute(node)
            if name == "unsqueeze":
                return self._unsqueeze(node)
            if name == "squeeze":
                return self._squeeze(node)
            if name == "flatten":
                return self._flatten(node)
            if name == "unflatten":
                return self._unflatten(node)
            if name in ("chunk", "split", "split_with_sizes", "unbind"):
                return self._split(node, name)
            if (node.op == "call_function" and target in _ELEMENTWISE_FUNCS) or (
                node.op == "call_method" and name in _ELEMENTWISE_METHODS
            ):
                return self._elementwise(node, token_inputs, name)
        raise TokenAxisError("op not modelled for partial token compute")

    def _elementwise(self, node: fx.Node, token_inputs: list[fx.Node], name: str):
        meta = tensor_meta(node)
        if meta is None:
            raise TokenAxisError("no tensor metadata")
        layouts = set()
        for a in token_inputs:
            layout = self.axes[a]
            layouts.add(layout.with_axis(layout.axis + meta.dim() - tensor_meta(a).dim()))
        if len(layouts) != 1:
            raise TokenAxisError("token operands with different layouts")
        layout = layouts.pop()
        if name in _REDUCTIONS or node.target in (F.softmax,) or name == "softmax":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            src = tensor_meta(token_inputs[0]).dim()
            if not dims or any(_norm_dim(d, src) == self.axes[token_inputs[0]].axis for d in dims):
                raise TokenAxisError("reduction over the token axis")
        if node.target in (F.layer_norm, F.rms_norm, torch.layer_norm, torch.rms_norm):
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            if len(shape) > meta.dim() - 1 - layout.axis:
                raise TokenAxisError("normalisation over the token axis")
        if node.target is F.group_norm:
            raise TokenAxisError("group_norm mixes tokens")
        for i, a in enumerate(node.args):
            if layout.has_image and isinstance(a, fx.Node) and a not in self.axes:
                other = tensor_meta(a)
                if other is None:
                    continue
                j = layout.axis - (meta.dim() - other.dim())
                if 0 <= j < other.dim() and other.shape[j] != 1:
                    if other.shape[j] != layout.concrete(self.n0):
                        raise TokenAxisError("operand broadcast along tokens with another extent")
                    self.positions.append((node.name, i, j, layout))
        return self._check(node, layout)

    def _reshape(self, node: fx.Node):
        layout = self.axes[node.args[0]]
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
            shape[j] = self.expr_for(shape[j], layout)
            args = (node.args[0], tuple(shape)) if start == -1 else (node.args[0], *shape)
            self.template(node, args)
        elif j < len(shape) and not isinstance(shape[j], int):
            raise TokenAxisError("symbolic reshape extent on the token axis")
        return self._check(node, layout.with_axis(j))

    def _transpose(self, node: fx.Node):
        layout = self.axes[node.args[0]]
        nd = tensor_meta(node).dim()
        a, b = (_norm_dim(d, nd) for d in node.args[1:3])
        axis = b if layout.axis == a else a if layout.axis == b else layout.axis
        return self._check(node, layout.with_axis(axis))

    def _permute(self, node: fx.Node):
        layout = self.axes[node.args[0]]
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        nd = tensor_meta(node).dim()
        dims = [_norm_dim(d, nd) for d in dims]
        return self._check(node, layout.with_axis(dims.index(layout.axis)))

    def _unsqueeze(self, node: fx.Node):
        layout = self.axes[node.args[0]]
        d = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs["dim"], tensor_meta(node).dim())
        return self._check(node, layout.with_axis(layout.axis + (1 if d <= layout.axis else 0)))

    def _squeeze(self, node: fx.Node):
        layout = self.axes[node.args[0]]
        src = tensor_meta(node.args[0])
        dims = node.args[1:] or ([node.kwargs["dim"]] if "dim" in node.kwargs else list(range(src.dim())))
        dims = [_norm_dim(d, src.dim()) for d in (dims[0] if isinstance(dims[0], (tuple, list)) else dims)]
        removed = [d for d in dims if src.shape[d] == 1 and d != layout.axis]
        # squeezing the token axis itself is a no-op while the subset keeps >= 2 tokens
        return self._check(node, layout.with_axis(layout.axis - sum(d < layout.axis for d in removed)))

    def _flatten(self, node: fx.Node):
        layout = self.axes[node.args[0]]
        src = tensor_meta(node.args[0]).dim()
        start = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0), src)
        end = _norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1), src)
        if start <= layout.axis <= end and start != end:
            raise TokenAxisError("flatten merges the token axis")
        axis = layout.axis - (end - start) if layout.axis > end else layout.axis
        return self._check(node, layout.with_axis(axis))

    def _unflatten(self, node: fx.Node):
        layout = self.axes[node.args[0]]
        src = tensor_meta(node.args[0]).dim()
        d = _norm_dim(node.args[1], src)
        if d == layout.axis:
            raise TokenAxisError("unflatten of the token axis")
        axis = layout.axis + (len(node.args[2]) - 1 if d < layout.axis else 0)
        return self._check(node, layout.with_axis(axis))

    def _split(self, node: fx.Node, name: str):
        layout = self.axes[node.args[0]]
        src = tensor_meta(node.args[0])
        if name == "unbind":
            d = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), src.dim())
            if d == layout.axis:
                raise TokenAxisError("unbind over the token axis")
            new = layout.with_axis(layout.axis - (1 if d < layout.axis else 0))
            return [new] * src.shape[d]
        size_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("chunks"))
        d = _norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), src.dim())
        if d != layout.axis:
            if name == "chunk":
                return [layout] * int(size_arg)
            count = len(size_arg) if isinstance(size_arg, (list, tuple)) else math.ceil(src.shape[d] / size_arg)
            return [layout] * count
        if name == "chunk" or not isinstance(size_arg, (list, tuple)):
            raise TokenAxisError("equal-size split of the token axis")
        bounds = layout.boundaries(self.n0)
        pieces, exprs, pos = [], [], 0
        for size in size_arg:
            start, stop = pos, pos + size
            if start not in bounds or stop not in bounds:
                raise TokenAxisError("split of the token axis inside a segment")
            segs = layout.segments[bounds.index(start): bounds.index(stop)]
            pieces.append(TokenAxis(layout.axis, segs))
            exprs.append(sympy.Add(*[s for _, s in segs]))
            pos = stop
        args = list(node.args)
        args[1] = exprs
        self.template(node, tuple(args))
        return pieces

    def _getitem(self, node: fx.Node):
        layout = self.axes[node.args[0]]
        src = tensor_meta(node.args[0]).dim()
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(isinstance(i, fx.Node) for i in index):
            raise TokenAxisError("tensor indexing on a token tensor")
        if Ellipsis in index:
            k = index.index(Ellipsis)
            used = sum(1 for i in index if i is not None and i is not Ellipsis)
            index = index[:k] + (slice(None),) * (src - used) + index[k + 1:]
        in_dim, out_dim, axis, new_index, layout_out = 0, 0, None, list(index), layout
        for pos, item in enumerate(index):
            if item is None:
                out_dim += 1
                continue
            if in_dim == layout.axis:
                if not isinstance(item, slice):
                    raise TokenAxisError("integer index on the token axis")
                layout_out, new_index[pos] = self._slice(item, layout)
                axis = out_dim
            if isinstance(item, slice):
                out_dim += 1
            in_dim += 1
        if axis is None:  # token axis not indexed explicitly: trailing dims map through
            axis = out_dim + (layout.axis - in_dim)
        if tuple(new_index) != index:
            self.template(node, (node.args[0], tuple(new_index)))
        return self._check(node, layout_out.with_axis(axis))

    def _slice(self, item: slice, layout: TokenAxis):
        if item.step not in (None, 1):
            raise TokenAxisError("strided slice of the token axis")
        bounds = layout.boundaries(self.n0)
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

    def _cat(self, node: fx.Node):
        tensors = node.args[0]
        meta = tensor_meta(node)
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        stack = node.target is torch.stack
        d = _norm_dim(d, meta.dim())
        token = [t for t in tensors if t in self.axes]
        axes = {self.axes[t].axis for t in token}
        if len(axes) != 1:
            raise TokenAxisError("concatenated token tensors disagree on the token axis")
        axis = axes.pop()
        if stack:
            if any(t not in self.axes for t in tensors) or len({self.axes[t] for t in token}) != 1:
                raise TokenAxisError("stack with non-token tensors")
            return self._check(node, self.axes[token[0]].with_axis(axis + (1 if d <= axis else 0)))
        if d != axis:
            if any(t not in self.axes for t in tensors) or len({self.axes[t].segments for t in token}) != 1:
                raise TokenAxisError("concatenation with a non-token tensor along another axis")
            return self._check(node, self.axes[token[0]])
        segments: list = []
        for t in tensors:
            if t in self.axes:
                segments.extend(self.axes[t].segments)
            else:
                segments.append((TEXT, sympy.Integer(int(tensor_meta(t).shape[d]))))
        return self._check(node, TokenAxis(axis, tuple(segments)))

    def _attention(self, node: fx.Node):
        names = ("query", "key", "value")
        q, k, v = (node.args[i] if len(node.args) > i else node.kwargs.get(n) for i, n in enumerate(names))
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if mask is not None:
            raise TokenAxisError("attention with a mask")
        if q not in self.axes:
            raise TokenAxisError("keys carry image tokens but queries do not")
        q_layout = self.axes[q]
        k_layout = self.axes.get(k)
        if (k_layout is None) != (v not in self.axes):
            raise TokenAxisError("keys and values with different token layouts")
        if k_layout is not None and k_layout.segments != self.axes[v].segments:
            raise TokenAxisError("keys and values with different token layouts")
        self.sites.append(AttentionSite(
            node=node.name, query=q.name, key=k.name, value=v.name, query_layout=q_layout,
            key_layout=k_layout, scale=node.kwargs.get("scale"),
        ))
        return self._check(node, q_layout)


def _entry_and_last(branches: list[ResidualBranch], order: dict[str, int]) -> tuple[str, ResidualBranch]:
    stream = [b for b in branches if b.stream != CONTEXT_STREAM]
    if not stream:
        raise TokenAxisError("no image-stream residual branches")
    first = min(stream, key=lambda b: order[b.source])
    last = max(stream, key=lambda b: order[b.add])
    if first.stream != IMAGE_STREAM:
        raise TokenAxisError("the first block does not start on the image stream")
    return first.source, last


def analyze_token_axis(gm: fx.GraphModule, branches: list[ResidualBranch] | None = None) -> TokenRegion:
    """Token layout of the image-token region of ``gm``. Pure analysis."""
    branches = find_residual_branches(gm) if branches is None else branches
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    entry_name, last = _entry_and_last(branches, order)
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
    region = ({entry} | (downstream & ancestors([exit_node]))) | {exit_node}
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
        if any(a in region and a is not exit_node for a in n.all_input_nodes):
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
