"""The dynamo backend: analyze -> rewrite -> compile -> runtime.

``torch.compile(model, backend=specdiff_backend)`` hands this module one torch-level FX
graph per compiled frame.  We build the graph variants the policy needs, compile each
(Inductor or eager), and return a :class:`SpecDiffRuntime` that picks a variant per call.
Anything we cannot handle compiles as the plain graph with one warning naming why:
never an exception inside dynamo, never a silently wrong result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .config import SpecDiffConfig
from .passes import (
    build_branch_record_variant,
    build_branch_reuse_variant,
    count_kinds,
    find_graph_inputs,
    find_residual_branches,
)
from .passes.forecast_variants import (
    ForecastError,
    build_forecast_record_variant,
    build_forecast_variant,
    lite_targets,
    probe_targets,
)
from .passes.collectives import (
    has_collectives,
    has_rank_partials,
    output_group,
    prune_dead_collectives,
    reduce_rank_partials,
)
from .passes.token_axis import TokenAxisError, analyze_token_axis
from .passes.token_forecast import build_token_forecast_variant, forecast_residuals
from .passes.token_select import select_tokens_in_graph
from .passes.verify import VariantVerificationError, output_signature, verify_variant, with_fake_values
from .passes.token_variants import (
    ImportanceSampling,
    build_token_draft_variant,
    build_token_partial_variant,
    build_token_record_variant,
    importance_plan,
)
from .runtime import (
    DRAFT,
    FORECAST,
    FULL,
    PARTIAL,
    REUSE,
    AlwaysFull,
    BufferRole,
    BufferSpec,
    ClockFollower,
    ForecastRuntime,
    FullStepSchedule,
    PipelineClock,
    SpecDiffRuntime,
    StepClock,
    TokenRuntime,
    warn_fallback,
)


log = logging.getLogger("specdiff_fx")


def trace_artifacts(graphs: dict[str, fx.GraphModule], analysis: dict) -> None:
    """Emit the variant graphs (named as the runtime names them) and the analysis as
    structured-trace artifacts, so ``TORCH_TRACE`` + tlparse show them beside dynamo's."""
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": "specdiff_analysis", "encoding": "json"},
                     payload_fn=lambda: json.dumps(analysis, default=str))
    for name, graph in graphs.items():
        trace_structured(
            "artifact",
            metadata_fn=lambda name=name: {"name": f"specdiff_{name}_graph", "encoding": "string"},
            payload_fn=lambda graph=graph: graph.print_readable(
                print_output=False, include_stride=True, include_device=True),
        )


class UnsupportedGraph(Exception):
    """A graph the passes cannot handle; the backend falls back to a plain compile."""


def _has_symbolic_shapes(example_inputs: Sequence[Any]) -> bool:
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            return True
        if isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape):
            return True
    return False


class SpecDiffBackend:
    """A dynamo backend bound to one :class:`SpecDiffConfig`."""

    def __init__(self, config: SpecDiffConfig | None = None) -> None:
        self.config = config if config is not None else SpecDiffConfig()
        self._runtimes: list[tuple[weakref.ref, frozenset[int]]] = []
        # every graph of the model shares its steps (graph breaks, docs/design.md)
        self.clock = StepClock()
        self._leader: weakref.ref | None = None
        # the pipeline's clock when compile_pipeline drives this backend (docs/pipelines.md)
        self.pipeline_clock: PipelineClock | None = None
        # least-squares sums every forecast runtime feeds while fit_forecaster runs (calibrate.py)
        self.forecast_calibration = None

    def __repr__(self) -> str:
        return f"SpecDiffBackend({self.config!r})"

    # ----------------------------------------------------------------- dynamo entry
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **_: Any) -> Callable:
        try:
            runtime = self.build_runtime(gm, example_inputs)
            # inspection sees the variants as compiled (see _for_context_parallel)
            runtime.graphs = {name: g if name == "original" else _for_context_parallel(g)
                              for name, g in runtime.graphs.items()}
        except UnsupportedGraph as exc:
            runtime = self._fallback(gm, example_inputs, str(exc))
        except Exception as exc:  # a bug of ours must not break the user's compile
            runtime = self._fallback(gm, example_inputs, f"internal error {type(exc).__name__}: {exc}")
        self._register(runtime, example_inputs)
        log.info("specdiff: %s graph (%d nodes): %s", self.config.policy, len(gm.graph.nodes),
                 f"fallback: {runtime.fallback}" if runtime.fallback else
                 f"variants {sorted(runtime.variants)}, {runtime.info.get('branches', 0)} branches")
        return runtime

    def build_runtime(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> SpecDiffRuntime:
        cfg = self.config
        if _has_symbolic_shapes(example_inputs):
            raise UnsupportedGraph("symbolic shapes; compile with dynamic=False")
        inputs = find_graph_inputs(gm, cfg.timestep_input)
        common = dict(
            timestep_index=inputs.timestep_index,
            signature_indices=inputs.user_indices,
            example_inputs=example_inputs,
            timestep_direction=cfg.timestep_direction,
            clock=self.clock,
            cudagraphs=cfg.cudagraphs,
            latent_index=_latent_input_index(gm, inputs),
            pipeline_clock=self.pipeline_clock,
        )
        if cfg.policy == "off":
            return SpecDiffRuntime(
                policy="off", variants={FULL: self.compile(gm, example_inputs)},
                schedule=AlwaysFull(), **common,
            )
        follow = None
        if inputs.timestep_index is None:
            follow = self._follower()
            if follow is not None and cfg.policy in ("fora", "taylor"):
                common["follow"] = follow  # the blocks after a graph break follow the model's steps
            else:
                follow = None
        if inputs.timestep_index is None and follow is None:
            raise UnsupportedGraph(
                "no timestep input found (set SpecDiffConfig.timestep_input to its name; if the model's "
                "code breaks the graph, e.g. .tolist()/.item()/.cpu() in diffusers, the blocks run in a "
                "frame that never sees the timestep: torch._dynamo.explain(model)(**inputs) shows where)"
            )
        # a frame that follows may be a block traced on its own after a graph break, so
        # adds in its own forward are residuals (find_residual_branches)
        branches = find_residual_branches(gm, frame_root_adds=inputs.timestep_index is None)
        if not branches:
            raise UnsupportedGraph("no residual branches found in the graph")
        if cfg.policy == "specdiff":
            if has_collectives(gm):
                raise UnsupportedGraph(
                    "context parallelism: token-level caching of a graph with collectives is not "
                    "supported (docs/context_parallel.md); use policy 'fora' or 'taylor'")
            return self._token_runtime(gm, example_inputs, inputs, branches, common)
        if cfg.policy == "taylor":
            return self._forecast_runtime(gm, example_inputs, branches, common)
        held = _cache_dtype(cfg)
        record, specs = build_branch_record_variant(gm, branches, held)
        reuse, _ = build_branch_reuse_variant(gm, branches, held)
        trace_artifacts({FULL: record, REUSE: reuse},
                        {"branches": [dataclasses.asdict(b) for b in branches]})
        buffers, examples = _buffers_and_examples(specs, example_inputs)
        _verify_all({FULL: record, REUSE: reuse}, gm, examples)
        return SpecDiffRuntime(
            policy=cfg.policy,
            variants={FULL: self.compile(record, examples), REUSE: self.compile(reuse, examples)},
            buffer_specs=buffers,
            schedule=FullStepSchedule(cfg.warmup_steps, cfg.interval or None, cfg.reset_steps),
            info={"branches": len(branches), "branch_kinds": count_kinds(branches)},
            graphs={"original": gm, FULL: record, REUSE: reuse},
            **common,
        )

    def _forecast_runtime(self, gm, example_inputs, branches, common) -> ForecastRuntime:
        cfg = self.config
        try:
            # the probe computes the first block: per branch, or in lite mode as chains of their own
            targets = lite_targets(gm, branches, cfg.group_blocks, probe_first_block=cfg.probe) \
                if cfg.lite else branches
            probe = probe_targets(targets, branches[0].block) if cfg.probe else ()
            held = _cache_dtype(cfg)
            record, specs = build_forecast_record_variant(gm, targets, cfg.taylor_order, held)
            forecast, _ = build_forecast_variant(gm, targets, cfg.taylor_order, probe, held)
        except ForecastError as exc:
            raise UnsupportedGraph(f"forecasting not possible: {exc}") from exc
        trace_artifacts({FULL: record, FORECAST: forecast},
                        {"targets": [dataclasses.asdict(t) for t in targets], "probe": list(probe)})
        buffers, examples = _buffers_and_examples(specs, example_inputs)
        _verify_all({FULL: record, FORECAST: forecast}, gm, examples)
        info = {"branches": len(branches), "branch_kinds": count_kinds(branches),
                "forecast_targets": len(targets), "probe_branches": len(probe)}
        if probe:
            info["probe_flops_share"] = _probe_flops_share(gm, example_inputs, forecast, examples, targets,
                                                           cfg.taylor_order, held)
        runtime = ForecastRuntime(
            policy=cfg.policy,
            variants={FULL: self.compile(record, examples), FORECAST: self.compile(forecast, examples)},
            buffer_specs=buffers,
            schedule=FullStepSchedule(cfg.warmup_steps, cfg.interval or None, cfg.reset_steps),
            order=cfg.taylor_order,
            forecaster=cfg.forecaster,
            forecaster_options=cfg.forecaster_options,
            variable=cfg.forecast_variable,
            tolerance=_tolerance_for(gm, cfg.tolerance, forecast),
            tolerance_growth=cfg.tolerance_growth,
            probe=cfg.probe,
            info=info,
            graphs={"original": gm, FULL: record, FORECAST: forecast},
            **common,
        )
        if self.forecast_calibration is not None:
            runtime.calibrate(self.forecast_calibration)
        return runtime

    def _token_runtime(self, gm, example_inputs, inputs, branches, common) -> TokenRuntime:
        cfg = self.config
        try:
            region = analyze_token_axis(gm, branches)
        except TokenAxisError as exc:
            raise UnsupportedGraph(f"token-level caching not possible: {exc}") from exc
        k = max(2, min(region.num_tokens, round((1.0 - cfg.cache_ratio) * region.num_tokens)))
        sampling = ImportanceSampling(cfg.importance_query_stride, cfg.importance_queries, cfg.importance_sites)
        try:
            record, record_specs = build_token_record_variant(gm, region, sampling)
            partial, partial_specs = build_token_partial_variant(gm, region, k)
            graphs = {"original": gm, FULL: record, PARTIAL: partial}
            built = {FULL: (record, record_specs), PARTIAL: (partial, partial_specs)}
            if cfg.draft_steps >= 2:
                draft, draft_specs = build_token_draft_variant(gm, region, sampling)
                graphs[DRAFT] = draft
                built[DRAFT] = (draft, draft_specs)
            if cfg.c3 == "forecast":  # forecast each token's residual over the blocks
                for name in (FULL, PARTIAL):
                    built[name] = forecast_residuals(*built[name], region)
                    graphs[name] = built[name][0]
                record_specs, partial_specs = built[FULL][1], built[PARTIAL][1]
            # the partial variant picks its own tokens (scores, top-k, classes) from device buffers
            built[PARTIAL] = select_tokens_in_graph(*built[PARTIAL], k, cfg.c2_share, cfg.score_lambda)
            graphs[PARTIAL], partial_specs = built[PARTIAL]
            if cfg.c3 == "forecast" and cfg.partial_every > 1:  # steps with no token computed
                token_forecast, forecast_specs = build_token_forecast_variant(gm, region, residual=True)
                graphs[FORECAST] = token_forecast
                built[FORECAST] = (token_forecast, forecast_specs)
        except TokenAxisError as exc:
            raise UnsupportedGraph(f"token-level caching not possible: {exc}") from exc
        expected = output_signature(gm)
        for name, (graph, specs) in built.items():  # every variant runs once on fake tensors first
            _verify(name, graph, list(example_inputs) + [_example_buffer(s, region.num_tokens) for s in specs],
                    expected)
        trace_artifacts({name: g for name, g in graphs.items() if name != "original"},
                        {"region": {"entry": region.entry, "exit": region.exit, "tokens": region.num_tokens,
                                    "subset": k, "sites": [s.node for s in region.sites]}})

        latent_index = common["latent_index"]
        variants, flops = {}, {}
        for name, (graph, specs) in built.items():
            graph_inputs = list(example_inputs)
            if name == DRAFT:  # the draft passes latents and timestep of its own, contiguous
                for i in (latent_index, inputs.timestep_index):
                    if i is not None and isinstance(graph_inputs[i], torch.Tensor):
                        graph_inputs[i] = graph_inputs[i].contiguous()
            examples = graph_inputs + [_example_buffer(s, region.num_tokens) for s in specs]
            flops[name] = count_flops(graph, examples)
            variants[name] = self.compile(graph, examples)
        return TokenRuntime(
            policy=cfg.policy,
            variants=variants,
            schedule=FullStepSchedule(cfg.warmup_steps, None, cfg.reset_steps,
                                      cfg.partial_every if FORECAST in built else None),
            record_specs=record_specs,
            partial_specs=partial_specs,
            draft_specs=built[DRAFT][1] if DRAFT in built else [],
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
            graphs=graphs,
            **common,
        )

    def compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        gm = _for_context_parallel(gm)
        if self.config.compiler == "eager":
            return gm
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, list(example_inputs), config_patches=dict(self.config.inductor_config) or None)

    def _fallback(self, gm: fx.GraphModule, example_inputs: Sequence[Any], reason: str) -> SpecDiffRuntime:
        warn_fallback(reason)
        try:  # a plain graph that has the timestep still counts the model's steps for its other graphs
            timestep_index = None if _has_symbolic_shapes(example_inputs) else \
                find_graph_inputs(gm, self.config.timestep_input).timestep_index
        except Exception:
            timestep_index = None
        return SpecDiffRuntime(
            policy=self.config.policy,
            variants={FULL: self.compile(gm, example_inputs)},
            fallback=reason,
            graphs={"original": gm},  # inspect still reports what it found
            cudagraphs=self.config.cudagraphs,
            timestep_index=timestep_index,
            timestep_direction=self.config.timestep_direction,
            clock=self.clock if timestep_index is not None else None,
            pipeline_clock=self.pipeline_clock,
            example_inputs=example_inputs,
        )

    def _follower(self) -> ClockFollower | None:
        """A view of the steps of the latest graph with a timestep (None if there is none)."""
        leader = self._leader() if self._leader is not None else None
        return ClockFollower(self.clock, leader) if leader is not None else None

    # ----------------------------------------------------------------- runtimes
    def _register(self, runtime: SpecDiffRuntime, example_inputs: Sequence[Any]) -> None:
        if runtime.timestep_index is not None and runtime.clock is self.clock:
            self._leader = weakref.ref(runtime)
        params = frozenset(id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
        self._runtimes = [(r, p) for r, p in self._runtimes if r() is not None]
        self._runtimes.append((weakref.ref(runtime), params))

    def all_runtimes(self) -> list[SpecDiffRuntime]:
        """Every live runtime this backend built, siblings included."""
        self._runtimes = [(r, p) for r, p in self._runtimes if r() is not None]
        return [rt for ref, _ in self._runtimes for rt in ref().all_runtimes()]

    def runtimes_for(self, model: torch.nn.Module) -> list[SpecDiffRuntime]:
        """Every live runtime of ``model``: one per graph it compiled to (frames of a model
        whose code breaks the graph, calls of other shapes), oldest first.  Two modules through
        one graph each have their own (SpecDiffRuntime.siblings)."""
        params = {p.data_ptr() for p in model.parameters() if p.data_ptr()}
        self._runtimes = [(r, p) for r, p in self._runtimes if r() is not None]
        found = []
        for ref, _ in self._runtimes:
            for runtime in ref().all_runtimes():
                if runtime.param_ptrs & params or (not runtime.param_ptrs and not params):
                    found.append(runtime)
        return found


class ModelRuntime:
    """What ``get_runtime(model)`` returns: one view of every runtime a model compiled to.

    Attribute access goes to the *primary* runtime: the one that caches (no fallback) with the
    most residual branches, then the most calls, then the latest; a model compiled to one graph has just
    that one.  ``stats()`` and ``report()`` add a row per frame (graph), with fallbacks named,
    so a model whose code breaks the graph (HiDream, Lumina2, Qwen-Image) reports what each
    of its frames did; ``reset()`` and ``begin_trajectory()`` reach all of them."""

    def __init__(self, runtimes: Sequence[SpecDiffRuntime]) -> None:
        if not runtimes:
            raise ValueError("a model view needs at least one runtime")
        self.runtimes = list(runtimes)
        ranked = sorted(enumerate(self.runtimes), key=lambda ir: (
            ir[1].fallback is None, ir[1].info.get("branches", 0), ir[1].stats()["calls"], ir[0]))
        self.primary = ranked[-1][1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["primary"], name)

    def frames(self) -> list[dict]:
        rows = []
        for i, runtime in enumerate(self.runtimes):
            s = runtime.stats()
            rows.append({"frame": i, "primary": runtime is self.primary, "policy": s["policy"],
                         "fallback": s["fallback"], "branches": s.get("branches", 0), "calls": s["calls"],
                         "trajectories": s["trajectories"], "steps": s["steps"],
                         "cached_steps": s["cached_steps"], "clock": s.get("clock")})
        return rows

    def stats(self) -> dict:
        return {**self.primary.stats(), "frames": self.frames()}

    def report(self) -> str:
        from tabulate import tabulate

        text = self.primary.report()
        if len(self.runtimes) > 1:
            rows = [[f["frame"], "*" if f["primary"] else "", f["fallback"] or "-", f["branches"], f["calls"],
                     f["trajectories"], f"{f['steps']} ({f['cached_steps']} cached)"] for f in self.frames()]
            text += "\n\nframes (graphs this model compiled to; * reported above)\n" + tabulate(
                rows, headers=["frame", "", "fallback", "branches", "calls", "trajectories", "steps"])
        return text

    def reset(self) -> None:
        for runtime in self.runtimes:
            runtime.reset()

    def begin_trajectory(self) -> None:
        """The next call starts a new trajectory, in every frame (docs/pipelines.md)."""
        for runtime in self.runtimes:
            runtime.begin_trajectory()


def _cache_dtype(cfg: SpecDiffConfig) -> torch.dtype | None:
    """``SpecDiffConfig.cache_dtype`` as a torch dtype (None: the model's own)."""
    return None if cfg.cache_dtype is None else getattr(torch, cfg.cache_dtype)


def _verify(name: str, graph: fx.GraphModule, examples: Sequence[Any], expected) -> None:
    """Run variant ``name`` on fake tensors (passes/verify.py) and refresh its node metadata;
    a failure becomes a fallback naming the node, never an error at step N."""
    try:
        with_fake_values(graph, verify_variant(graph, examples, expected))
    except VariantVerificationError as exc:
        raise UnsupportedGraph(f"the {name} variant failed build-time verification at {exc}") from exc


def _verify_all(graphs: dict[str, fx.GraphModule], original: fx.GraphModule, examples: Sequence[Any]) -> None:
    """Every branch-level variant runs once on fake tensors before it is compiled, as the token
    variants do: its outputs must match the original graph's (shapes, dtypes)."""
    expected = output_signature(original)
    for name, graph in graphs.items():
        _verify(name, graph, examples, expected)


def _for_context_parallel(gm: fx.GraphModule) -> fx.GraphModule:
    """A variant as it runs under context parallelism (unchanged without collectives).

    Rank-local partials (a probe's sums over this rank's tokens) are all-reduced over the
    group that gathers the output, so a decision reads the same value on every rank.  A
    variant that drops branch bodies drops their collectives too: ``wait_tensor`` is impure,
    so dead-code elimination keeps them (and the projections feeding them).  Both changes
    are structural, so every rank makes the same ones.
    """
    if not has_collectives(gm):
        return gm
    group = output_group(gm)
    if group is not None and has_rank_partials(gm):
        gm = reduce_rank_partials(gm, group)
    return prune_dead_collectives(gm)


def _tolerance_for(gm: fx.GraphModule, tolerance: float | None, forecast: fx.GraphModule) -> float | None:
    """The forecast tolerance under context parallelism: kept when the probe's error sums are
    marked rank-local partials (then all-reduced, see _for_context_parallel), else off --
    each rank's probe sees only its shard, and a rank that refreshed alone would issue
    collectives the others do not (a hang)."""
    if tolerance is None or not has_collectives(gm):
        return tolerance
    if output_group(gm) is not None and has_rank_partials(forecast):
        return tolerance
    warnings.warn("specdiff: tolerance is off under context parallelism (per-rank probe errors would "
                  "desync the ranks); the fixed schedule stays", RuntimeWarning, stacklevel=2)
    return None


def _buffers_and_examples(specs: Sequence[BufferSpec],
                          example_inputs: Sequence[Any]) -> tuple[list[BufferSpec], list[Any]]:
    """A branch-level variant's extra inputs as the passes describe them (the runtime allocates
    from the same specs), and the example inputs to compile it with (the graph's own, then zero
    buffers)."""
    buffers = list(specs)
    return buffers, list(example_inputs) + [torch.zeros(b.shape, dtype=b.dtype, device=b.device) for b in buffers]


def _example_buffer(spec: BufferSpec, num_tokens: int) -> torch.Tensor:
    if spec.role == BufferRole.INDEX:  # valid, distinct token positions
        return torch.arange(spec.shape[1], device=spec.device).expand(spec.shape).contiguous()
    return torch.zeros(spec.shape, dtype=spec.dtype, device=spec.device)


def _latent_input_index(gm: fx.GraphModule, inputs) -> int | None:
    """The user input the model's first output predicts for (the latents), if any."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    first = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    meta = first.meta.get("example_value") if isinstance(first, fx.Node) else None
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if meta is None:
        return None
    candidates = []
    for i in inputs.user_indices:
        value = placeholders[i].meta.get("example_value")
        if isinstance(value, torch.Tensor) and value.dim() == meta.dim() and value.shape[0] == meta.shape[0] \
                and tuple(value.shape[2:]) == tuple(meta.shape[2:]):
            candidates.append(i)
    named = [i for i in candidates if "encoder" not in placeholders[i].name]
    return (named or [None])[0]


def _probe_flops_share(gm, example_inputs, forecast, examples, targets, order, held) -> float | None:
    """What the error probe adds to a forecast step, as a share of a full step's FLOPs: the
    forecast variant with the probe minus the same variant built without it, over the original
    graph (informative; None where a count fails)."""
    plain, _ = build_forecast_variant(gm, targets, order, (), held)
    full, with_probe, without = (count_flops(gm, example_inputs), count_flops(forecast, examples),
                                 count_flops(plain, examples))
    if not full or with_probe is None or without is None:
        return None
    return (with_probe - without) / full


def count_flops(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> int | None:
    """Matmul-like FLOPs of one call (torch.utils.flop_counter), run on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        # The math kernel makes attention two counted matmuls; fused CPU kernels count 0.
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, sdpa_kernel(SDPBackend.MATH):
            fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
            with FlopCounterMode(display=False) as counter:
                gm(*fake)
        return int(counter.get_total_flops())
    except Exception:  # the estimate is informative only
        return None


def make_backend(config: SpecDiffConfig | None = None, **overrides: Any) -> SpecDiffBackend:
    """A backend for ``config`` (default config if None), with field ``overrides`` applied."""
    config = config if config is not None else SpecDiffConfig()
    return SpecDiffBackend(config.replace(**overrides) if overrides else config)


specdiff_backend = SpecDiffBackend()
"""The backend with the default configuration; also registered as ``backend="specdiff"``."""


def backend_of(model: Any) -> SpecDiffBackend:
    """The specdiff backend a model was compiled with: ``torch.compile(model, backend=...)``
    (an OptimizedModule) or ``model.compile(backend=...)`` in place (what compile_pipeline does)."""
    from torch._dynamo.eval_frame import OptimizedModule, _TorchDynamoContext, innermost_backend

    if isinstance(model, OptimizedModule):
        callback = model.dynamo_ctx.callback
    elif isinstance(model, torch.nn.Module) and getattr(model, "_compiled_call_impl", None) is not None:
        # nn.Module.compile keeps torch.compile(self._call_impl); its dynamo context is in the closure
        cells = getattr(model._compiled_call_impl, "__closure__", None) or ()
        contexts = [c.cell_contents for c in cells if isinstance(c.cell_contents, _TorchDynamoContext)]
        if not contexts:
            raise TypeError("could not find the backend of this in-place compiled module")
        callback = contexts[0].callback
    else:
        raise TypeError("get_runtime expects a model compiled with a specdiff backend: the module returned by "
                        "torch.compile(model, backend=...), or one compiled in place (model.compile(...), "
                        "specdiff_fx.compile_pipeline)")
    backend = innermost_backend(callback)
    backend = getattr(backend, "compiler_fn", backend)  # torch.compile's _TorchCompileWrapper
    if not isinstance(backend, SpecDiffBackend):
        raise TypeError(f"this model was compiled with backend {backend!r}, not a specdiff backend")
    return backend


def get_runtime(compiled_model: Any) -> ModelRuntime:
    """Every runtime behind ``compiled_model`` as one view (:class:`ModelRuntime`): attributes
    of the runtime that caches most, ``stats()``/``report()`` with a row per frame."""
    backend = backend_of(compiled_model)
    model = getattr(compiled_model, "_orig_mod", compiled_model)
    runtimes = backend.runtimes_for(model)
    if not runtimes:
        raise LookupError("no specdiff runtime yet: call the compiled model once first")
    return ModelRuntime(runtimes)
