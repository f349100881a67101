"""Build-time verification of graph variants on fake tensors.

Why: a rewrite that leaves one constant at N (a RoPE table, a reshape extent) builds
without complaint and then fails inside the user's pipeline at the first partial step,
minutes into a run.  Running every variant once at build time under ``FakeTensorMode``
costs milliseconds, touches no real memory, and turns that class of bug into a loud
fallback that names the node, before dynamo ever sees the callable.

The same run yields the fake value of every node, so the variant's node metadata
(``example_value`` / ``val``) can be made true again after the rewrite changed shapes
(the role torch's ``FakeTensorUpdater`` plays for post-grad passes): inspection and
FLOPs then read the shapes at k, not the stale shapes at N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..buffers import shape_exprs
from .fake_run import FakeRun, VariantVerificationError

__all__ = ["OutputSignature", "VariantVerificationError", "fake_run", "output_signature", "verify_variant",
           "with_fake_values"]


@dataclass(frozen=True)
class OutputSignature:
    """Shape and dtype of each tensor a graph returns (None for non-tensors)."""

    items: tuple[tuple[tuple[int, ...], torch.dtype] | None, ...]


def _flat_outputs(value: Any) -> list:
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _flat_outputs(item)]
    return [value]


def _describe(values: Sequence[Any]) -> OutputSignature:
    return OutputSignature(tuple(
        (shape_exprs(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None for v in values))


def _same_value(got, expected) -> bool:
    """Two (shape, dtype) items equal where a shape is symbolic and written two ways (a fake run
    writes ``2*((s0 - 1)//2) + 2`` where dynamo wrote ``s0 + s0 % 2``): equal at every size
    checked, the sizes of the build and a few others."""
    if got is None or expected is None or got[1] != expected[1] or len(got[0]) != len(expected[0]):
        return False
    import random

    import sympy

    symbols = sorted({s for x in (*got[0], *expected[0]) if not isinstance(x, int) for s in x.free_symbols}, key=str)
    rng = random.Random(0)
    for _ in range(8):
        at = {s: sympy.Integer(rng.randint(2, 5000)) for s in symbols}
        for a, b in zip(got[0], expected[0]):
            if sympy.sympify(a).xreplace(at) != sympy.sympify(b).xreplace(at):
                return False
    return True


def output_signature(gm: fx.GraphModule) -> OutputSignature:
    """What ``gm`` returns, read from the metadata dynamo recorded on the output's inputs."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    values = []
    for arg in _flat_outputs(output.args[0]):
        meta = arg.meta.get("example_value", arg.meta.get("val")) if isinstance(arg, fx.Node) else arg
        values.append(meta)
    return _describe(values)


def fake_run(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list, dict[str, Any]]:
    """Run ``gm`` on fake copies of ``example_inputs`` (passes/fake_run.py): (flat outputs, fake
    value per node name).  ``gm``'s metadata is left as it was."""
    from torch._subclasses.fake_tensor import FakeTensor

    mode = next((x.fake_mode for x in example_inputs if isinstance(x, FakeTensor)), None)
    if mode is not None:  # a dynamic graph's fake inputs: run in their mode, on their symbolic sizes
        runner = FakeRun(gm, mode=mode)
        out = runner.run_fake(example_inputs, convert=False)
    else:
        runner = FakeRun(gm)
        out = runner.run_fake(example_inputs)
    return _flat_outputs(out), runner.values


def verify_variant(variant: fx.GraphModule, example_inputs: Sequence[Any],
                   expected: OutputSignature) -> dict[str, Any]:
    """Run ``variant`` once on fake tensors; its outputs must match ``expected`` in shape
    and dtype.  Returns the fake value of every node; raises
    :class:`VariantVerificationError` naming the failing node.  Pure: ``variant`` is read only."""
    outputs, values = fake_run(variant, example_inputs)
    got = _describe(outputs)
    if len(got.items) != len(expected.items):
        raise VariantVerificationError("output", f"returns {len(got.items)} values, the original {len(expected.items)}")
    for i, (g, e) in enumerate(zip(got.items, expected.items)):
        if g != e and not _same_value(g, e):
            raise VariantVerificationError("output", f"output {i} is {g}, the original's is {e}")
    return values


def with_fake_values(gm: fx.GraphModule, values: dict[str, Any]) -> fx.GraphModule:
    """Set ``example_value`` (the key dynamo's graphs carry) of ``gm``'s nodes to the
    propagated fake values; nodes the rewrite inserted get one too.

    Only metadata changes; meant for a variant the caller just built and owns."""
    for node in gm.graph.nodes:
        if node.name in values:
            node.meta["example_value"] = values[node.name]
    return gm
