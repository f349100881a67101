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
from .runtime import (
    FULL,
    REUSE,
    AlwaysFull,
    BufferSpec,
    FullStepSchedule,
    SpecDiffRuntime,
    warn_fallback,
)


def trace_artifacts(graphs: dict[str, fx.GraphModule], analysis: dict) -> None:
    """Emit the rewritten graphs (and the analysis) as structured-trace artifacts, so
    ``TORCH_TRACE`` + tlparse show them next to dynamo's own graphs."""
    from torch._logging._internal import trace_structured_artifact

    trace_structured_artifact("specdiff_analysis", "json", lambda: json.dumps(analysis, default=str))
    for name, graph in graphs.items():
        trace_structured_artifact(
            f"specdiff_{name}_graph", "string",
            lambda graph=graph: graph.print_readable(print_output=False, include_stride=True),
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

    def __repr__(self) -> str:
        return f"SpecDiffBackend({self.config!r})"

    # ----------------------------------------------------------------- dynamo entry
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **_: Any) -> Callable:
        try:
            runtime = self.build_runtime(gm, example_inputs)
        except UnsupportedGraph as exc:
            runtime = self._fallback(gm, example_inputs, str(exc))
        except Exception as exc:  # a bug of ours must not break the user's compile
            runtime = self._fallback(gm, example_inputs, f"internal error {type(exc).__name__}: {exc}")
        self._register(runtime, example_inputs)
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
        )
        if cfg.policy == "off":
            return SpecDiffRuntime(
                policy="off", variants={FULL: self.compile(gm, example_inputs)},
                schedule=AlwaysFull(), **common,
            )
        if inputs.timestep_index is None:
            raise UnsupportedGraph(
                "no timestep input found (set SpecDiffConfig.timestep_input to its name)"
            )
        branches = find_residual_branches(gm)
        if not branches:
            raise UnsupportedGraph("no residual branches found in the graph")
        record, specs = build_branch_record_variant(gm, branches)
        reuse, _ = build_branch_reuse_variant(gm, branches)
        trace_artifacts({"branch_record": record, "branch_reuse": reuse},
                        {"branches": [dataclasses.asdict(b) for b in branches]})
        buffers = [BufferSpec(s.input_name, s.shape, s.dtype, s.device) for s in specs]
        examples = list(example_inputs) + [
            torch.zeros(b.shape, dtype=b.dtype, device=b.device) for b in buffers
        ]
        return SpecDiffRuntime(
            policy=cfg.policy,
            variants={FULL: self.compile(record, examples), REUSE: self.compile(reuse, examples)},
            buffer_specs=buffers,
            schedule=FullStepSchedule(cfg.warmup_steps, cfg.interval, cfg.reset_steps),
            info={"branches": len(branches), "branch_kinds": count_kinds(branches)},
            graphs={"original": gm, FULL: record, REUSE: reuse},
            **common,
        )

    def compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if self.config.compiler == "eager":
            return gm
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, list(example_inputs), config_patches=dict(self.config.inductor_config) or None)

    def _fallback(self, gm: fx.GraphModule, example_inputs: Sequence[Any], reason: str) -> SpecDiffRuntime:
        warn_fallback(reason)
        return SpecDiffRuntime(
            policy=self.config.policy,
            variants={FULL: self.compile(gm, example_inputs)},
            fallback=reason,
        )

    # ----------------------------------------------------------------- runtimes
    def _register(self, runtime: SpecDiffRuntime, example_inputs: Sequence[Any]) -> None:
        params = frozenset(id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
        self._runtimes = [(r, p) for r, p in self._runtimes if r() is not None]
        self._runtimes.append((weakref.ref(runtime), params))

    def runtime_for(self, model: torch.nn.Module) -> SpecDiffRuntime | None:
        """The most recent live runtime built for a graph of ``model``."""
        params = {id(p) for p in model.parameters()}
        for ref, owned in reversed(self._runtimes):
            runtime = ref()
            if runtime is not None and (owned & params or (not owned and not params)):
                return runtime
        return None


def make_backend(config: SpecDiffConfig | None = None, **overrides: Any) -> SpecDiffBackend:
    """A backend for ``config`` (default config if None), with field ``overrides`` applied."""
    config = config if config is not None else SpecDiffConfig()
    return SpecDiffBackend(config.replace(**overrides) if overrides else config)


specdiff_backend = SpecDiffBackend()
"""The backend with the default configuration; also registered as ``backend="specdiff"``."""


def get_runtime(compiled_model: Any) -> SpecDiffRuntime:
    """The runtime behind the most recent compiled graph of ``compiled_model``."""
    from torch._dynamo.eval_frame import OptimizedModule, innermost_backend

    if not isinstance(compiled_model, OptimizedModule):
        raise TypeError("get_runtime expects the module returned by torch.compile(..., backend=<specdiff>)")
    backend = innermost_backend(compiled_model.dynamo_ctx.callback)
    backend = getattr(backend, "compiler_fn", backend)  # torch.compile's _TorchCompileWrapper
    if not isinstance(backend, SpecDiffBackend):
        raise TypeError(f"this model was compiled with backend {backend!r}, not a specdiff backend")
    runtime = backend.runtime_for(compiled_model._orig_mod)
    if runtime is None:
        raise LookupError("no specdiff runtime yet: call the compiled model once first")
    return runtime
