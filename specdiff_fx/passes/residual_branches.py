"""Residual-branch discovery: find every ``x + gate * f(x)`` in a dynamo graph.

A *branch* is the computation between the point ``x`` where it leaves the residual
stream and the value ``f`` that is added back.  Caching a branch means storing ``f`` at a
full step and feeding the stored value to the residual add at a cached step, so the
whole body (norm, projections, attention, MLP, gate) drops out of the graph.

The rules are structural, so they hold across diffusers families without adapters:

* the add's two operands and its result have the same shape (adaLN ``x*(1+s)+b`` and
  bias/temb broadcasts are excluded);
* ``f`` is computed inside the module that owns the add, and the other operand (the
  *skip*) is ``x`` itself or a short shortcut chain from it (e.g. a ResNet's
  ``conv_shortcut``) inside that module;
* the body contains a heavy op (linear, conv, matmul, attention), so RoPE's
  ``x*cos + rot(x)*sin`` and similar elementwise mixes are not branches.

What is cached: the branch *before* its gate when the branch ends in ``gate * g``
(adaLN-Zero blocks).  The gate is a cheap function of the timestep embedding, so it is
recomputed at every step and only the expensive ``g`` is reused, as FORA does.

Granularity: when a branch's body contains another branch's add (a UNet
``Transformer2DModel`` around its ``BasicTransformerBlock`` residuals), only the
*outermost* branch is kept.  It saves the most work per cached step, and nested adds
disappear with its body anyway.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn.functional as F

from ..buffers import same_shape, shape_exprs
from .graph_queries import (
    ancestors,
    descendants,
    is_add,
    is_attention,
    is_conv,
    is_heavy,
    is_linear,
    is_mul,
    tensor_meta,
)
from .module_paths import block_of, module_path_of

SELF_ATTENTION = "self_attention"
CROSS_ATTENTION = "cross_attention"
FEED_FORWARD = "feed_forward"
RESNET = "resnet"
PARALLEL = "parallel"          # single-stream block: attention and MLP side by side
TRANSFORMER = "transformer"    # a branch whose body holds whole transformer blocks
BRANCH_KINDS = (SELF_ATTENTION, CROSS_ATTENTION, FEED_FORWARD, RESNET, PARALLEL, TRANSFORMER)

IMAGE_STREAM = "image"
CONTEXT_STREAM = "context"     # text tokens of SD3/FLUX dual-stream blocks
JOINT_STREAM = "joint"         # text and image concatenated (FLUX single-stream blocks)

_MAX_SHORTCUT_LEN = 6


@dataclass(frozen=True)
class ResidualBranch:
    """One residual branch, described by node *names* so it maps onto graph copies."""

    name: str                  # unique, readable: "<owner>:<kind>"
    owner: str                 # module path of the residual add
    block: str                 # repeated unit the owner belongs to
    kind: str
    stream: str
    add: str                   # the residual add node
    source: str                # where the branch leaves the residual stream (x)
    output: str                # the value added back to the stream (f)
    gate: str | None           # operand of the final ``gate * branch`` mul, if any
    cached: str                # what a cache stores: f, or the branch before its gate
    body: tuple[str, ...]      # nodes computed only for this branch, in graph order
    modules: tuple[str, ...] = field(default=())  # module paths inside the body
    attention_nodes: tuple[str, ...] = field(default=())
    shape: tuple[int, ...] = field(default=())


def _same_shape(*nodes: fx.Node) -> bool:
    metas = [tensor_meta(n) for n in nodes]
    if any(m is None for m in metas):
        return False
    return all(same_shape(m.shape, metas[0].shape) for m in metas)


def _inside(path: str, owner: str) -> bool:
    return owner == "" or path == owner or path.startswith(owner + ".")


_SHORTCUT_METHODS = {"contiguous", "to", "float", "half", "bfloat16", "type", "clone"}
_SHORTCUT_FUNCTIONS = {F.interpolate, F.avg_pool2d, F.max_pool2d, F.avg_pool1d}


def _is_shortcut_op(node: fx.Node) -> bool:
    """Ops a skip path may apply to x (ResNet conv_shortcut, resampling, casts)."""
    if node.op == "call_method":
        return node.target in _SHORTCUT_METHODS
    return node.op == "call_function" and (
        is_conv(node) or is_linear(node) or node.target in _SHORTCUT_FUNCTIONS
    )


def _shortcut_source(skip: fx.Node, f_ancestors: set[fx.Node], owner: str) -> fx.Node | None:
    """Head of a short shortcut chain (conv_shortcut, resample, cast) from ``skip`` to x."""
    node = skip
    for _ in range(_MAX_SHORTCUT_LEN):
        if not (_is_shortcut_op(node) and _inside(module_path_of(node), owner)):
            return None
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            return None
        node = first
        if node in f_ancestors:
            return node
    return None


def _classify(body: set[fx.Node], source: fx.Node, nested: bool) -> tuple[str, list[fx.Node]]:
    attention = [n for n in body if is_attention(n)]
    if nested or len(attention) > 1:
        return TRANSFORMER, attention
    if attention:
        sdpa = attention[0]
        around = ancestors([sdpa]) | descendants([sdpa])
        if any(is_linear(n) for n in body - around - {sdpa}):
            return PARALLEL, attention
        key = sdpa.args[1] if len(sdpa.args) > 1 else sdpa.kwargs.get("key")
        if isinstance(key, fx.Node) and key not in body:
            return CROSS_ATTENTION, attention
        return SELF_ATTENTION, attention
    if any(is_conv(n) for n in body):
        return RESNET, attention
    return FEED_FORWARD, attention


def _is_sequence_concat(node: fx.Node) -> bool:
    """``cat`` of (batch, tokens, width) sequences along the token axis."""
    if not (node.op == "call_function" and getattr(node.target, "__name__", "") == "cat"):
        return False
    meta = tensor_meta(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return meta is not None and meta.dim() == 3 and dim in (1, -2)


def _through_same_shape_ops(node: fx.Node) -> fx.Node:
    """Back through single-input ops that keep the shape (fp16 ``.clip``, casts) to what feeds them."""
    while node.op in ("call_function", "call_method") and len(node.all_input_nodes) == 1 \
            and _same_shape(node, node.all_input_nodes[0]):
        node = node.all_input_nodes[0]
    return node


def _stream(source: fx.Node, body: set[fx.Node], output: fx.Node, joint_adds: set[fx.Node]) -> str:
    """``joint``: the branch reads text and image tokens concatenated -- the concat itself, or the
    residual add of a joint branch before it (AuraFlow and Chroma concatenate once, before their
    single-stream blocks; FLUX in each block)."""
    if _is_sequence_concat(source) or _through_same_shape_ops(source) in joint_adds:
        return JOINT_STREAM
    first_users = [u for u in source.users if u in body]
    paths = [module_path_of(n) for n in first_users] + [module_path_of(output)]
    for p in paths:
        if any("context" in part or part == "to_add_out" for part in p.split(".")):
            return CONTEXT_STREAM
    return IMAGE_STREAM


def find_residual_branches(gm: fx.GraphModule, *, frame_root_adds: bool = False) -> list[ResidualBranch]:
    """All outermost residual branches of ``gm``, in graph order. Pure analysis.

    Module paths are relative to the frame dynamo traced.  For a whole model that root is
    the model, and an add written in the model's own ``forward`` is not a block's residual,
    so root-owned adds are skipped.  Where diffusers code breaks the graph inside a block
    (HiDream's MoE routing), dynamo traces the block's ``forward`` as its own frame and its
    residual adds are root-owned: ``frame_root_adds=True`` accepts them when the frame's root
    is a block, i.e. no attention or conv in it sits under a list index (a model-level frame
    reaches its attention through ``transformer_blocks.3`` or ``down_blocks.0``).  The
    backend sets it for frames without the timestep (docs/design.md, graph breaks).
    """
    if frame_root_adds:
        frame_root_adds = not any(
            any(part.isdigit() for part in module_path_of(n).split("."))
            for n in gm.graph.nodes if is_attention(n) or is_conv(n))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found: list[tuple[fx.Node, fx.Node, fx.Node, set[fx.Node]]] = []
    for add in gm.graph.nodes:
        if not is_add(add) or len(add.args) < 2:
            continue
        a, b = add.args[0], add.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and _same_shape(add, a, b)):
            continue
        owner = module_path_of(add)
        if not owner and not frame_root_adds:
            continue
        # Direct residuals (skip is x itself) take precedence over shortcut chains.
        orientations = [(s, o, direct) for direct in (True, False) for s, o in ((a, b), (b, a))]
        for skip, out, direct in orientations:
            if not _inside(module_path_of(out), owner):
                continue
            out_anc = ancestors([out])
            if direct:
                source = skip if skip in out_anc else None
            else:
                source = _shortcut_source(skip, out_anc, owner)
            if source is None:
                continue
            body = (descendants([source]) & out_anc) | {out}
            if any(is_heavy(n) for n in body):
                found.append((add, source, out, body))
                break

    adds = {c[0] for c in found}
    joint_adds: set[fx.Node] = set()  # ``found`` is in graph order: a joint branch feeds the next
    branches: list[ResidualBranch] = []
    names: Counter[str] = Counter()
    for add, source, out, body in found:
        if any(add in other_body for other_add, _, _, other_body in found if other_add is not add):
            continue  # nested inside a larger branch; see module docstring
        nested = any(other in body for other in adds if other is not add)
        kind, attention = _classify(body, source, nested)
        owner = module_path_of(add)
        gate, cached = None, out.name
        if is_mul(out):
            outside = [x for x in out.all_input_nodes if x not in body]
            inside = [x for x in out.all_input_nodes if x in body]
            if len(outside) == 1 and len(inside) == 1:
                gate, cached = outside[0].name, inside[0].name
        stream = _stream(source, body, out, joint_adds)
        if stream == JOINT_STREAM:
            joint_adds.add(add)
        base = f"{owner}:{kind}" if stream == IMAGE_STREAM else f"{owner}:{stream}_{kind}"
        names[base] += 1
        name = base if names[base] == 1 else f"{base}#{names[base]}"
        meta = tensor_meta(out)
        branches.append(
            ResidualBranch(
                name=name,
                owner=owner,
                block=block_of(owner),
                kind=kind,
                stream=stream,
                add=add.name,
                source=source.name,
                output=out.name,
                gate=gate,
                cached=cached,
                body=tuple(n.name for n in sorted(body, key=order.__getitem__)),
                modules=tuple(sorted({p for p in (module_path_of(n) for n in body) if p})),
                attention_nodes=tuple(n.name for n in sorted(attention, key=order.__getitem__)),
                shape=shape_exprs(meta.shape) if meta is not None else (),
            )
        )
    return branches


def count_kinds(branches: list[ResidualBranch]) -> dict[str, int]:
    """``{"self_attention": 2, ...}``; context-stream branches count as ``context_<kind>``."""
    counts: Counter[str] = Counter()
    for br in branches:
        counts[br.kind if br.stream == IMAGE_STREAM else f"{br.stream}_{br.kind}"] += 1
    return dict(counts)
