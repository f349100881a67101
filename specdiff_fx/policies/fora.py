"""Policy ``fora``: recompute every residual branch at full steps, reuse each branch's output
in between (FORA).

Why it stays: the simplest branch-level cache, the reference the forecasting policy improves
on, and the one every frame of a model broken into several graphs can follow.
"""

from __future__ import annotations

import dataclasses

from ..passes import build_branch_record_variant, build_branch_reuse_variant, count_kinds
from ..runtime import FULL, REUSE, FullStepSchedule, CachingRuntime
from .base import CACHE_DTYPE, BuildContext, Policy, cache_dtype, trace_artifacts, verify_variants, with_buffers


class Fora(Policy):
    name = "fora"
    order = 1
    summary = "cached steps reuse every residual branch's output from the last full step"
    fields = (CACHE_DTYPE,)
    schedule = (2, 3, ())
    runs_at = {FULL: "full steps (record every branch)", REUSE: "cached steps (every branch reused)"}
    follows_graph_breaks = True

    def build(self, ctx: BuildContext) -> CachingRuntime:
        cfg, gm, branches = ctx.config, ctx.gm, ctx.branches
        held = cache_dtype(cfg.cache_dtype)
        record, specs = build_branch_record_variant(gm, branches, held)
        reuse, _ = build_branch_reuse_variant(gm, branches, held)
        trace_artifacts({FULL: record, REUSE: reuse}, {"branches": [dataclasses.asdict(b) for b in branches]})
        examples = with_buffers(ctx.example_inputs, specs)
        verify_variants({FULL: (record, examples), REUSE: (reuse, examples)}, gm)
        return CachingRuntime(
            policy=self.name,
            variants={FULL: ctx.compile(record, examples), REUSE: ctx.compile(reuse, examples)},
            buffer_specs=list(specs),
            schedule=FullStepSchedule(cfg.warmup_steps, cfg.interval or None, cfg.reset_steps,
                                      full_at=cfg.full_at),
            info={"branches": len(branches), "branch_kinds": count_kinds(branches)},
            graphs={"original": gm, FULL: record, REUSE: reuse},
            **ctx.common,
        )


POLICY = Fora()
