"""Policy ``sandwich``: the first and the last blocks run at every step; the blocks between them
are forecast at cached steps, one residual per stream (first-order Taylor over the last two
full steps).

Why: the first blocks see this step's input and the last ones shape the output, so computing
them keeps a cached step anchored to the real trajectory (the "Fn/Bn" structure of cache-dit's
DBCache), while the middle of the stack -- most of its cost -- is skipped.  It trades speed
for quality against lite ``taylor``, which skips every block.

This module is the whole policy: config section, variants (from the forecasting passes),
runtime (:class:`ForecastRuntime`), and when each variant runs.  docs/design.md, "Adding a
policy", uses it as the example.
"""

from __future__ import annotations

import dataclasses

from ..passes import count_kinds
from ..passes.forecast_variants import (
    ForecastError,
    build_forecast_record_variant,
    build_forecast_variant,
    lite_targets,
)
from ..runtime import FORECAST, FULL, ForecastRuntime, FullStepSchedule
from .base import BuildContext, Field, Policy, UnsupportedGraph, trace_artifacts, verify_variants, with_buffers
from .checks import an_int


class Sandwich(Policy):
    name = "sandwich"
    order = 4
    summary = "the first and last blocks run every step; the blocks between them are forecast"
    fields = (
        Field("front_blocks", 1, an_int(0), "sandwich: blocks at the start of the stack computed at every step.", "int"),
        Field("back_blocks", 1, an_int(0), "sandwich: blocks at the end of the stack computed at every step.", "int"),
    )
    schedule = (3, 5, ())
    runs_at = {FULL: "full steps (record the middle's residual)",
               FORECAST: "cached steps (first and last blocks computed, the middle forecast)"}
    follows_graph_breaks = False  # a frame after a graph break holds a part of the stack only

    def build(self, ctx: BuildContext) -> ForecastRuntime:
        cfg, gm, branches = ctx.config, ctx.gm, ctx.branches
        middle, kept = middle_branches(branches, cfg.front_blocks, cfg.back_blocks)
        if not middle:
            raise UnsupportedGraph(f"sandwich: the graph has {len(kept)} blocks, none between the first "
                                   f"{cfg.front_blocks} and the last {cfg.back_blocks}")
        try:
            targets = lite_targets(gm, middle)
            record, specs = build_forecast_record_variant(gm, targets)
            forecast, _ = build_forecast_variant(gm, targets)
        except ForecastError as exc:
            raise UnsupportedGraph(f"sandwich: forecasting not possible: {exc}") from exc
        trace_artifacts({FULL: record, FORECAST: forecast},
                        {"targets": [dataclasses.asdict(t) for t in targets], "computed_blocks": kept})
        examples = with_buffers(ctx.example_inputs, specs)
        verify_variants({FULL: (record, examples), FORECAST: (forecast, examples)}, gm)
        return ForecastRuntime(
            policy=self.name,
            variants={FULL: ctx.compile(record, examples), FORECAST: ctx.compile(forecast, examples)},
            buffer_specs=list(specs),
            schedule=FullStepSchedule(cfg.warmup_steps, cfg.interval or None, cfg.reset_steps,
                                      full_at=cfg.full_at),
            info={"branches": len(branches), "branch_kinds": count_kinds(branches),
                  "forecast_targets": len(targets), "computed_blocks": len(kept)},
            graphs={"original": gm, FULL: record, FORECAST: forecast},
            **ctx.common,
        )


def middle_branches(branches: list, front: int, back: int) -> tuple[list, list[str]]:
    """The branches of the blocks between the first ``front`` and the last ``back`` blocks (in
    the order the blocks first appear among ``branches``), and the blocks kept computed."""
    blocks = list(dict.fromkeys(b.block for b in branches))
    kept = blocks[:front] + blocks[len(blocks) - back:] if back else blocks[:front]
    kept = list(dict.fromkeys(kept))
    return [b for b in branches if b.block not in kept], kept


POLICY = Sandwich()
