"""Policy ``specdiff``: token-level, self-speculative caching (docs/design.md, "The method").

Full steps record every token's features and an importance score per token; partial steps
compute only the top-k tokens through every block, the others compose their value from their
history (C3) or reuse it (C2); a short draft trajectory scores the tokens a step ahead.

Why a module of its own: the token engine needs the token-axis analysis and its own variants
(record, partial, draft, forecast), none of which the branch-level policies share.
"""

from __future__ import annotations

import torch

from ..passes import count_kinds
from ..passes.collectives import has_collectives
from ..passes.token_lines import TokenLineError, add_kv_lines, add_token_lines
from ..passes.token_axis import TokenAxisError, analyze_token_axis
from ..passes.token_forecast import build_token_forecast_variant
from ..passes.token_select import select_tokens_in_graph
from ..passes.token_variants import (
    ImportanceSampling,
    build_token_draft_variant,
    build_token_partial_variant,
    build_token_record_variant,
    importance_plan,
)
from ..runtime import DRAFT, FORECAST, FULL, PARTIAL, FullStepSchedule, TokenRuntime
from ..runtime.token_runtime import C3_MODES
from .base import BuildContext, Field, Policy, UnsupportedGraph, trace_artifacts, verify_variants, with_buffers
from .checks import a_bool, a_callable_or_none, a_number, an_int, one_of
from .flops import count_flops


class SpecDiff(Policy):
    name = "specdiff"
    shape_general = False  # the subset size k and every N-dependent constant are re-evaluated at a call's N
    order = 3
    summary = "partial steps compute the most important tokens; the others follow their history"
    fields = (
        Field("cache_ratio", 0.7, a_number(0, 1),
              "share of image tokens *not* computed at partial steps (C2 + C3); the computed subset "
              "has k = round((1 - cache_ratio) * N).", "float"),
        Field("c2_share", 0.3, a_number(0, 1),
              "score-mass share of the lowest-scoring tokens that reuse their last value as is (C2); "
              "the rest of the cached tokens mix history (C3).", "float"),
        Field("c3", "history", one_of(*C3_MODES),
              "how cached tokens other than C2 are composed: ``\"history\"`` (weighted average of the "
              "last three outputs) or ``\"forecast\"`` (per-token line through the last two outputs).", "str"),
        Field("partial_every", 1, an_int(1),
              "with ``c3=\"forecast\"``: every n-th step after a full step is partial, the others "
              "compute no token (every token forecast, blocks skipped).  1: all partial.", "int"),
        Field("kv_forecast", None, a_bool(none=True),
              "with ``c3=\"forecast\"``: each K/V cache entry follows a line through its last two "
              "computed values, so a partial step attends to forecast keys/values of the tokens it "
              "does not compute (graph ops, passes/token_lines.py).  None (default): on with "
              "``c3=\"forecast\"``, where it gained 0.6-0.8 dB on three of four schedules of the "
              "reference model for 0.05 of a plain step per partial step (docs/forecasting.md).",
              "bool | None"),
        Field("kv_horizon", 1.0, a_number(0, low_open=True, none=True, finite=False),
              "with ``kv_forecast``: the most steps a K/V entry is extrapolated (None: no limit).", "float | None"),
        Field("score_lambda", 1.0, a_number(0),
              "λ in exp(λ · cached_count), the anti-starvation term.", "float"),
        Field("draft_steps", 2, an_int(0),
              "steps of the self-speculative draft (0 or 1 disables it).", "int"),
        Field("draft_update", None, a_callable_or_none,
              "``f(x, model_output, t, t_next, scale) -> x_next`` advancing the draft; default: the "
              "pipeline's sampler, else an Euler step of a velocity (flow-matching) model.", "Callable | None"),
        Field("importance_query_stride", 4, an_int(1),
              "s > 1 estimates the attention each token receives from one query in every s "
              "(jittered) at 1/s of the cost; 1 with ``importance_queries=None`` is exact.", "int"),
        Field("importance_queries", 64, an_int(1, none=True),
              "at most this many queries sampled per attention site (None: no cap); 16 keep PSNR "
              "within 0.3 dB of exact importance on the reference model (docs/scale.md).", "int | None"),
        Field("importance_sites", None, an_int(1, none=True),
              "score at most this many attention sites, spread evenly over the stack (None: all).", "int | None"),
    )
    # Measured on the reference model at 28 steps (examples/tune_specdiff.py): three warm-up
    # full steps and one reset mid-way keep PSNR ~29 dB at cache_ratio 0.7 with 4 full steps.
    schedule = (3, 1, (14,))
    runs_at = {FULL: "full steps (record)", PARTIAL: "partial steps (k tokens computed)", DRAFT: "draft trajectory",
               FORECAST: "forecast steps between partial steps (no token computed)"}

    def resolve(self, values: dict) -> None:
        if values["partial_every"] > 1 and values["c3"] != "forecast":
            raise ValueError("SpecDiffConfig.partial_every > 1 makes steps where no token is computed; "
                             "they need c3='forecast'")
        if values["kv_forecast"] is None:
            values["kv_forecast"] = values["c3"] == "forecast"
        if values["kv_forecast"] and values["c3"] != "forecast":
            raise ValueError("SpecDiffConfig.kv_forecast forecasts keys/values alongside the tokens' own "
                             "forecast; it needs c3='forecast'")

    def build(self, ctx: BuildContext) -> TokenRuntime:
        cfg, gm, branches = ctx.config, ctx.gm, ctx.branches
        if has_collectives(gm):
            raise UnsupportedGraph(
                "context parallelism: token-level caching of a graph with collectives is not "
                "supported (docs/context_parallel.md); use policy 'fora' or 'taylor'")
        try:
            region = analyze_token_axis(gm, branches)
        except TokenAxisError as exc:
            raise UnsupportedGraph(f"token-level caching not possible: {exc}") from exc
        k = max(2, min(region.num_tokens, round((1.0 - cfg.cache_ratio) * region.num_tokens)))
        sampling = ImportanceSampling(cfg.importance_query_stride, cfg.importance_queries, cfg.importance_sites)
        try:
            built = {FULL: build_token_record_variant(gm, region, sampling),
                     PARTIAL: build_token_partial_variant(gm, region, k)}
            if cfg.draft_steps >= 2:
                built[DRAFT] = build_token_draft_variant(gm, region, sampling)
            # the partial variant picks its own tokens (scores, top-k, classes) from device buffers
            built[PARTIAL] = select_tokens_in_graph(*built[PARTIAL], k, cfg.c2_share, cfg.score_lambda)
            if cfg.c3 == "forecast" and cfg.partial_every > 1:  # steps with no token computed
                built[FORECAST] = build_token_forecast_variant(gm, region, residual=True)
            if cfg.c3 == "forecast":  # each token's residual over the blocks follows its line
                built[FULL], built[PARTIAL], forecast = add_token_lines(
                    region, built[FULL], built[PARTIAL], built.get(FORECAST))
                if forecast is not None:
                    built[FORECAST] = forecast
            if cfg.kv_forecast:  # K/V entries the step does not compute read their forecast
                built[FULL], built[PARTIAL] = add_kv_lines(built[FULL], built[PARTIAL])
        except (TokenAxisError, TokenLineError) as exc:
            raise UnsupportedGraph(f"token-level caching not possible: {exc}") from exc
        examples = {}
        for name, (graph, specs) in built.items():
            graph_inputs = list(ctx.example_inputs)
            if name == DRAFT:  # the draft passes latents and timestep of its own, contiguous
                for i in (ctx.common["latent_index"], ctx.inputs.timestep_index):
                    if i is not None and isinstance(graph_inputs[i], torch.Tensor):
                        graph_inputs[i] = graph_inputs[i].contiguous()
            examples[name] = with_buffers(graph_inputs, specs)
        verify_variants({name: (graph, examples[name]) for name, (graph, _) in built.items()}, gm)
        trace_artifacts({name: graph for name, (graph, _) in built.items()},
                        {"region": {"entry": region.entry, "exit": region.exit, "tokens": region.num_tokens,
                                    "subset": k, "sites": [s.node for s in region.sites]}})
        flops = {name: count_flops(graph, examples[name]) for name, (graph, _) in built.items()}
        variants = {name: ctx.compile(graph, examples[name]) for name, (graph, _) in built.items()}
        return TokenRuntime(
            policy=self.name,
            variants=variants,
            schedule=FullStepSchedule(cfg.warmup_steps, None, cfg.reset_steps,
                                      cfg.partial_every if FORECAST in built else None, full_at=cfg.full_at),
            record_specs=built[FULL][1],
            partial_specs=built[PARTIAL][1],
            draft_specs=built[DRAFT][1] if DRAFT in built else [],
            forecast_specs=built[FORECAST][1] if FORECAST in built else [],
            subset_size=k,
            num_tokens=region.num_tokens,
            c2_share=cfg.c2_share,
            c3=cfg.c3,
            kv_forecast=cfg.kv_forecast,
            kv_horizon=cfg.kv_horizon,
            score_lambda=cfg.score_lambda,
            draft_steps=cfg.draft_steps,
            draft_update=cfg.draft_update,
            flops=flops,
            info={"branches": len(branches), "branch_kinds": count_kinds(branches),
                  "attention_sites": sum(s.key_layout is not None for s in region.sites),
                  "importance_sites": [{"site": node, "query_stride": stride}
                                       for node, stride in importance_plan(region, sampling)]},
            graphs={"original": gm, **{name: graph for name, (graph, _) in built.items()}},
            **ctx.common,
        )


POLICY = SpecDiff()
