"""The uncompiled graph variants a policy builds, named as the runtime names them.

This mirrors what ``SpecDiffBackend.build_runtime`` builds before compiling, so the
report shows exactly the graphs the runtime runs (fora's partial step is ``reuse``).
Everything downstream (diff, cost, report) reads only this dict and the ``specdiff``
node tags, so a new policy only needs a branch here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..config import SpecDiffConfig
from ..passes import (
    CacheSpec,
    ResidualBranch,
    build_branch_record_variant,
    build_branch_reuse_variant,
    copy_graph_module,
)
from ..runtime import FULL, REUSE


RUNS_AT = {FULL: "full steps", REUSE: "cached steps (fora's partial step)"}
"""When the runtime runs each variant, for the report; unknown variants show '-'."""


@dataclass(frozen=True)
class VariantSet:
    policy: str
    graphs: dict[str, fx.GraphModule]     # runtime variant name -> graph
    buffers: tuple[CacheSpec, ...] = ()   # cache inputs every variant takes after the graph's own


def build_variants(gm: fx.GraphModule, branches: list[ResidualBranch], policy: str) -> VariantSet:
    """Variants of ``gm`` under ``policy``; unknown or unimplemented policies raise as the config does."""
    SpecDiffConfig(policy=policy)
    if policy == "off":
        return VariantSet(policy, {FULL: copy_graph_module(gm)})
    if policy == "fora":
        if not branches:
            raise ValueError("policy 'fora' needs residual branches, and none were found "
                             "(the backend would fall back to a plain compile)")
        record, specs = build_branch_record_variant(gm, branches)
        reuse, _ = build_branch_reuse_variant(gm, branches)
        return VariantSet(policy, {FULL: record, REUSE: reuse}, tuple(specs))
    raise NotImplementedError(f"inspect does not know the variants of policy {policy!r} yet")
