"""Matmul-like FLOPs of one call of a graph, as the backend builds it (informative numbers for
``stats()`` and examples/probe_cost.py).

Why here: policies report what a variant costs (taylor's ``probe_flops_share``, specdiff's
per-variant FLOPs) from the graphs they build, on the same fake-tensor run that verifies them
(passes/fake_run.py: ``torch.utils.flop_counter`` with attention through the math kernel).
The inspection report's symbolic costs are another thing (inspect/cost.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx

from ..passes.fake_run import FakeRun, VariantVerificationError


def count_flops(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> int | None:
    """Matmul-like FLOPs of one call (passes/fake_run.py: torch.utils.flop_counter on fake tensors)."""
    runner = FakeRun(gm, count_flops=True)
    try:
        runner.run_fake(example_inputs)
    except VariantVerificationError:  # the estimate is informative only
        return None
    return runner.total_flops
