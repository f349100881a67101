"""Policy ``taylor``: full steps record finite differences of each forecast target, cached steps
forecast it as ``F + a1·D1 (+ a2·D2)`` with the coefficients of a forecaster
(runtime/forecasters.py).  With ``lite``, one residual per chain of blocks (cached steps skip
whole blocks); an optional probe computes the first block and estimates the forecast's error,
which can trigger a refresh (verified refresh, docs/forecasting.md).

Why it is the default: the best of our policies at 3-4x on the reference model (README, Results).
"""

from __future__ import annotations

import dataclasses
import warnings

from ..passes import count_kinds
from ..passes.collectives import has_collectives, output_group
from ..passes.forecast_variants import (
    ForecastError,
    build_forecast_record_variant,
    build_forecast_variant,
    lite_targets,
    probe_targets,
)
from ..passes.rank_partials import has_rank_partials
from ..runtime import FORECAST, FULL, ForecastRuntime, FullStepSchedule
from ..runtime.forecast_runtime import VARIABLES
from ..runtime.forecasters import FORECASTERS
from .base import (
    CACHE_DTYPE,
    BuildContext,
    Field,
    Policy,
    UnsupportedGraph,
    cache_dtype,
    trace_artifacts,
    verify_variants,
    with_buffers,
)
from .checks import a_bool, a_dict, a_number, an_int, one_of
from .flops import count_flops


def _forecaster_doc(f) -> str:
    notes = ([f"order {f.min_order}"] if f.min_order > 1 else []) + [f"option ``{o}``" for o in sorted(f.options)]
    return f"``\"{f.name}\"``" + (f" ({', '.join(notes)})" if notes else "")


class Taylor(Policy):
    name = "taylor"
    order = 2
    summary = "cached steps forecast each residual from finite differences recorded at full steps"
    fields = (
        Field("taylor_order", 1, one_of(1, 2),
              "1 (default) or 2, the order of the Taylor terms recorded (2 keeps a second difference, "
              "which ``newton`` and a fitted order-2 forecaster use).", "int"),
        Field("forecaster", "taylor", lambda v: v,  # checked against the registry in resolve()
              "how cached steps weigh the recorded terms, a forecaster of runtime/forecasters.py: "
              + ", ".join(_forecaster_doc(f) for f in FORECASTERS.values())
              + ".  Every choice runs the same compiled graphs (docs/forecasting.md, \"Forecasters\").", "str"),
        Field("forecaster_options", {}, a_dict,
              "the forecaster's options, e.g. ``{\"sigma\": 0.7}`` or ``{\"coefficients\": {step: (a1, a2)}}``.",
              "dict"),
        Field("forecast_variable", "step", one_of(*VARIABLES),
              "``\"step\"`` (k counts steps) or ``\"timestep\"`` (k is the timestep distance, "
              "following a sampler's uneven spacing).", "str"),
        Field("probe", False, a_bool(),
              "the cached-step graph still computes the first block and compares it with its "
              "forecast: a forecast-error estimate per step in ``stats()`` (per branch; with "
              "``lite``, the first block as a chain of its own).", "bool"),
        Field("lite", None, a_bool(none=True),
              "forecast one residual per chain of blocks (``output − input`` of ``group_blocks`` "
              "consecutive blocks per stream; None: the whole stack) instead of every branch: cached "
              "steps skip whole blocks.  Default (None): on, unless the probe is asked for.", "bool | None"),
        Field("group_blocks", None, an_int(1, none=True),
              "lite: blocks per forecast group (None: one group per stream).", "int | None"),
        Field("tolerance", None, a_number(0, low_open=True, none=True, finite=False),
              "when the probe's error estimate exceeds it, the next step is full (turns the probe "
              "on).  None: fixed schedule only.", "float | None"),
        Field("tolerance_growth", 0.0, a_number(0),
              "the threshold at step s is ``tolerance · (1 + tolerance_growth · s)``, looser late "
              "in the trajectory (needs ``tolerance``).", "float"),
        CACHE_DTYPE,
    )
    # Measured on the reference model (specdiff-fx bench): see README "Results".
    schedule = (3, 5, ())
    runs_at = {FULL: "full steps (record the terms)", FORECAST: "cached steps (residuals forecast, blocks skipped)"}
    follows_graph_breaks = True

    def resolve(self, values: dict) -> None:
        _check_forecaster(values)
        if values["tolerance"] is not None:
            values["probe"] = True  # the tolerance is checked against the probe
        if values["tolerance_growth"] and values["tolerance"] is None:
            raise ValueError("SpecDiffConfig.tolerance_growth scales the tolerance; set tolerance too")
        if values["lite"] is None:
            values["lite"] = not values["probe"]

    def on_replace(self, current, changes: dict) -> None:
        if "lite" not in changes and not current.probe and ("probe" in changes or "tolerance" in changes):
            changes["lite"] = None  # re-resolved: a probe asked for now turns it off

    def build(self, ctx: BuildContext) -> ForecastRuntime:
        cfg, gm, branches = ctx.config, ctx.gm, ctx.branches
        held = cache_dtype(cfg.cache_dtype)
        if ctx.block_frame and cfg.probe:
            raise UnsupportedGraph("the error probe computes the stack's first block, and this graph is one block "
                                   "compiled on its own (regional compilation): compile the whole model for the probe")
        try:
            # the probe computes the first block: per branch, or in lite mode as chains of their own
            targets = lite_targets(gm, branches, cfg.group_blocks, probe_first_block=cfg.probe) \
                if cfg.lite else branches
            probe = probe_targets(targets, branches[0].block) if cfg.probe else ()
            record, specs = build_forecast_record_variant(gm, targets, cfg.taylor_order, held)
            forecast, _ = build_forecast_variant(gm, targets, cfg.taylor_order, probe, held)
        except ForecastError as exc:
            raise UnsupportedGraph(f"forecasting not possible: {exc}") from exc
        trace_artifacts({FULL: record, FORECAST: forecast},
                        {"targets": [dataclasses.asdict(t) for t in targets], "probe": list(probe)})
        examples = with_buffers(ctx.example_inputs, specs)
        verify_variants({FULL: (record, examples), FORECAST: (forecast, examples)}, gm)
        info = {"branches": len(branches), "branch_kinds": count_kinds(branches),
                "forecast_targets": len(targets), "probe_branches": len(probe)}
        if probe:
            plain, _ = build_forecast_variant(gm, targets, cfg.taylor_order, (), held)
            info["probe_flops_share"] = probe_flops_share(
                count_flops(gm, ctx.example_inputs), count_flops(forecast, examples), count_flops(plain, examples))
        runtime = ForecastRuntime(
            policy=self.name,
            variants={FULL: ctx.compile(record, examples), FORECAST: ctx.compile(forecast, examples)},
            buffer_specs=list(specs),
            schedule=FullStepSchedule(cfg.warmup_steps, cfg.interval or None, cfg.reset_steps,
                                      full_at=cfg.full_at),
            order=cfg.taylor_order,
            forecaster=cfg.forecaster,
            forecaster_options=cfg.forecaster_options,
            variable=cfg.forecast_variable,
            tolerance=_tolerance_for(gm, cfg.tolerance, forecast),
            tolerance_growth=cfg.tolerance_growth,
            probe=cfg.probe,
            info=info,
            graphs={"original": gm, FULL: record, FORECAST: forecast},
            **ctx.common,
        )
        if ctx.forecast_calibration is not None:
            runtime.calibrate(ctx.forecast_calibration)
        return runtime


def _check_forecaster(values: dict) -> None:
    """The forecaster's entry decides (runtime/forecasters.py): its name, the Taylor order it
    needs, the option keys it reads and its own check of their values."""
    name, options = values["forecaster"], values["forecaster_options"]
    if name not in FORECASTERS:
        raise ValueError(f"SpecDiffConfig.forecaster must be one of {sorted(FORECASTERS)}, got {name!r}")
    need = FORECASTERS[name].min_order
    if need > values["taylor_order"]:
        raise ValueError(f"SpecDiffConfig.forecaster={name!r} reads the second difference: set taylor_order={need}")
    allowed = FORECASTERS[name].options
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"SpecDiffConfig.forecaster_options {sorted(unknown)} do not apply to forecaster "
                         f"{name!r} (it takes {sorted(allowed) or 'none'})")
    check = FORECASTERS[name].check
    if check is not None:
        try:
            values["forecaster_options"] = check(options)
        except ValueError as exc:
            raise ValueError(f"SpecDiffConfig.forecaster_options of forecaster {name!r}: {exc}") from exc


def probe_flops_share(full: int | None, with_probe: int | None, without: int | None) -> float | None:
    """What the error probe adds to a forecast step, as a share of a full step's FLOPs: the
    forecast variant with the probe minus the same variant built without it, over the original
    graph (informative; None where a count failed)."""
    if not full or with_probe is None or without is None:
        return None
    return (with_probe - without) / full


def _tolerance_for(gm, tolerance: float | None, forecast) -> float | None:
    """The forecast tolerance under context parallelism: kept when the probe's error sums are
    marked rank-local partials (then all-reduced by the backend), else off -- each rank's probe
    sees only its shard, and a rank that refreshed alone would issue collectives the others do
    not (a hang)."""
    if tolerance is None or not has_collectives(gm):
        return tolerance
    if output_group(gm) is not None and has_rank_partials(forecast):
        return tolerance
    warnings.warn("specdiff: tolerance is off under context parallelism (per-rank probe errors would "
                  "desync the ranks); the fixed schedule stays", RuntimeWarning, stacklevel=2)
    return None


POLICY = Taylor()
