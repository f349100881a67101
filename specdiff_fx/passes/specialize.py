"""A dynamic graph made static at the sizes of one call.

Why: the branch-level policies build one set of variants for every size a dynamic graph
serves (their buffers are sized symbolically, buffers.py).  Token-level specdiff cannot yet:
its analysis re-evaluates every size that depends on the image-token count at the subset
size k, and the subset is picked from the tokens of a concrete call.  Rather than stop caching
on a dynamic graph, its runtime specializes the graph at each request's sizes, in our runtime
and not in dynamo (so dynamo compiles one graph, and the recompile limit is never reached),
and builds the policy's variants on that static copy (docs/design.md, "Shape-general
variants").

:func:`specialize_graph` is pure: a copy of the graph whose every node's ``example_value``
is the fake value of a run at the call's concrete sizes (symbolic sizes become ints), which
is all a static build reads.  The copy still takes the dynamic graph's inputs, size inputs
included, so it is called with the call's own arguments.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .fake_run import FakeRun
from .graph_copy import copy_graph_module


def scalar_inputs(gm: fx.GraphModule) -> list[int]:
    """Positions of the inputs that are Python scalars dynamo made 0-dim tensors (a float default
    argument such as FLUX's RoPE ``theta``, a LoRA scale): the graph reads them back with
    ``.item()``.  A fake run cannot read such a value, so a specialization folds it in, and
    the value is part of what a specialization is for (``ShapeSpecialized``'s key)."""
    found = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu" \
                and any(u.op == "call_method" and u.target == "item" for u in node.users):
            found.append(i)
    return found


def specialize_graph(gm: fx.GraphModule, args: Sequence[Any]) -> fx.GraphModule:
    """A copy of ``gm`` with static metadata at the sizes of ``args`` (real inputs of one call),
    its scalar inputs (:func:`scalar_inputs`) folded in at their values in ``args``.
    Raises :class:`~specdiff_fx.passes.fake_run.VariantVerificationError` naming the node if
    the graph does not run at those sizes."""
    out = copy_graph_module(gm)
    placeholders = list(out.graph.find_nodes(op="placeholder"))
    fold_constant_scalars(out, {placeholders[i]: args[i] for i in scalar_inputs(gm)})
    concrete = [_concrete(a) for a in args]
    runner = FakeRun(out, mode=FakeTensorMode(allow_non_fake_inputs=True))
    runner.run_fake(concrete)
    for node in list(out.graph.nodes):
        if node.name not in runner.values:
            continue
        value = runner.values[node.name]
        scalar = isinstance(value, (bool, int, float))
        if node.op in ("placeholder", "call_function", "call_method") and scalar:
            # an int input (Qwen-Image's latent grid), or a size computed from the inputs' sizes
            # (x.size(1), s0 * s1 // 4): a literal at this call's values, as in the graph dynamo
            # traces at static sizes, so rewrites read numbers (the input stays, unread); the
            # caller keys a specialization on every such input (ShapeSpecialized)
            node.replace_all_uses_with(value)
            if node.op != "placeholder":
                out.graph.erase_node(node)
                continue
        node.meta["example_value"] = value
        node.meta.pop("val", None)
    out.recompile()
    return out


def fold_constant_scalars(gm: fx.GraphModule, seeds: dict[fx.Node, Any] | None = None) -> int:
    """Replace every Python scalar the graph computes from constants alone (its tensor
    attributes, and the ``seeds``: node -> value) by its value, in place on a copy the caller
    owns.  A fake run cannot read such a value (it depends on data); at static sizes dynamo
    would have baked it in.  Returns how many were folded."""
    constant: dict[fx.Node, Any] = dict(seeds or {})
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            constant[node] = _attr(gm, node.target)
            continue
        if node.op not in ("call_function", "call_method") or not node.all_input_nodes \
                or not all(n in constant for n in node.all_input_nodes):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: constant[n])
        try:
            fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
            value = fn(*(args[1:] if node.op == "call_method" else args), **kwargs)
        except Exception:  # not a constant we can evaluate: left to the fake run
            continue
        if isinstance(value, (bool, int, float)):
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)
            folded += 1
        elif isinstance(value, torch.Tensor):
            constant[node] = value
    if folded:
        gm.recompile()
    return folded


def _attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _concrete(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        raise TypeError("specialize_graph takes a call's concrete arguments, not symbolic ones")
    return value
