"""The dynamo backend: analyze -> rewrite -> compile -> runtime.

``torch.compile(model, backend=specdiff_backend)`` hands this module one torch-level FX
graph per compiled frame.  We build the graph variants the policy needs, compile each
(Inductor or eager), and return a :class:`CachingRuntime` that picks a variant per call.
Anything we cannot handle compiles as the plain graph with one warning naming why:
never an exception inside dynamo, never a silently wrong result.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import re
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._dynamo.exc import RestartAnalysis

from .buffers import ShapeBinding, symbolic_inputs
from .config import SpecDiffConfig
from .passes import count_kinds, find_graph_inputs, find_residual_branches
from .passes.collectives import has_collectives, output_group
from .passes.graph_inputs import is_unused_size
from .passes.prune_collectives import prune_dead_collectives
from .passes.rank_partials import has_rank_partials, reduce_rank_partials
from .passes.specialize import scalar_inputs, specialize_graph
from .policies import POLICIES, BuildContext, UnsupportedGraph
from .runtime import FULL, ClockFollower, PipelineClock, CachingRuntime, StepClock, warn_fallback


log = logging.getLogger("specdiff_fx")


NO_BRANCHES = "no residual branches found in the graph"


class NothingToCache(UnsupportedGraph):
    """A frame with no residual branches: no loss of caching when the model's other frames
    cache (Lumina2's and HiDream's frames around their graph breaks), so its warning waits
    for them (CachingRuntime.settle_fallback_warning)."""


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
        # every frame is a block compiled on its own (regional.py): its steps come from the clock
        self.regional = False
        # least-squares sums every forecast runtime feeds while fit_forecaster runs (calibrate.py)
        self.forecast_calibration = None

    def __repr__(self) -> str:
        return f"SpecDiffBackend({self.config!r})"

    # ----------------------------------------------------------------- dynamo entry
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **_: Any) -> Callable:
        policy = POLICIES[self.config.policy]
        dynamic = _is_dynamic(gm, example_inputs)
        if dynamic and not policy.shape_general:
            # a policy that builds at static sizes serves a dynamic graph by specializing it at
            # each call's sizes (passes/specialize.py): one dynamo graph, a build per new size
            log.info("specdiff: a dynamic graph under policy %s: its variants are built at each call's sizes",
                     policy.name)
            return ShapeSpecialized(self, gm, example_inputs)
        runtime = self._runtime_for(gm, example_inputs, quiet=dynamic)
        if dynamic and runtime.fallback is not None and not runtime.pending_warning:
            # variants that do not build at symbolic sizes (a size the rewrite cannot keep
            # symbolic) are built at each call's sizes instead, never a loss of caching
            log.info("specdiff: a dynamic graph the %s variants do not build on symbolically (%s): built at each "
                     "call's sizes instead", policy.name, runtime.fallback)
            return ShapeSpecialized(self, gm, example_inputs)
        self._register(runtime, example_inputs)
        return runtime

    def _runtime_for(self, gm: fx.GraphModule, example_inputs: Sequence[Any], quiet: bool = False) -> CachingRuntime:
        """The runtime of one graph, or a plain compile naming why not (never an exception,
        save dynamo's own requests to trace again).  ``quiet``: the caller may still cache
        another way, so a fallback's warning is the caller's to give."""
        try:
            runtime = self.build_runtime(gm, example_inputs)
            # inspection sees the variants as compiled (see _for_context_parallel)
            runtime.graphs = {name: g if name == "original" else _for_context_parallel(g)
                              for name, g in runtime.graphs.items()}
        except UnsupportedGraph as exc:
            runtime = self._fallback(gm, example_inputs, str(exc), deferred=isinstance(exc, NothingToCache),
                                     quiet=quiet and not isinstance(exc, NothingToCache))
        except RestartAnalysis:
            # dynamo's own control flow (Inductor asks it to trace again, e.g. with float inputs
            # specialized), not a failure: it calls this backend again with the new graph
            raise
        except Exception as exc:  # a bug of ours must not break the user's compile
            runtime = self._fallback(gm, example_inputs, f"internal error {type(exc).__name__}: {exc}", quiet=quiet)
        log.info("specdiff: %s graph (%d nodes): %s", self.config.policy, len(gm.graph.nodes),
                 f"fallback: {runtime.fallback}" if runtime.fallback else
                 f"variants {sorted(runtime.variants)}, {runtime.info.get('branches', 0)} branches")
        return runtime

    def specialized_runtime(self, gm: fx.GraphModule, args: Sequence[Any]) -> CachingRuntime:
        """The runtime of dynamic graph ``gm`` at the sizes of call ``args`` (ShapeSpecialized)."""
        try:
            static = specialize_graph(gm, args)
        except Exception as exc:
            runtime = self._fallback(gm, args, f"the dynamic graph could not be specialized at this call's sizes: "
                                               f"{type(exc).__name__}: {exc}")
        else:
            runtime = self._runtime_for(static, args)
        self._register(runtime, args)
        return runtime

    def build_runtime(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> CachingRuntime:
        """The runtime of one dynamo graph: what every policy needs (inputs, clock, branches),
        then the policy's own :meth:`~specdiff_fx.policies.Policy.build`."""
        cfg = self.config
        policy = POLICIES[cfg.policy]
        inputs = self._graph_inputs(gm)
        # A dynamic graph (docs/design.md, "Shape-general variants"): the variants are built and
        # compiled on its placeholders' fake values, sizes symbolic; the runtime allocates
        # buffers at each call's sizes, read where the binding says.
        dynamic = _is_dynamic(gm, example_inputs)
        variant_examples = _symbolic_fakes(gm, example_inputs) if dynamic else example_inputs
        common = dict(
            timestep_index=inputs.timestep_index,
            signature_indices=inputs.user_indices,
            example_inputs=example_inputs,
            timestep_direction=cfg.timestep_direction,
            clock=self.clock,
            cudagraphs=cfg.cudagraphs,
            latent_index=_latent_input_index(gm, inputs),
            pipeline_clock=self.pipeline_clock,
            shape_binding=ShapeBinding.of(variant_examples) if dynamic else None,
        )
        ctx = BuildContext(gm=gm, example_inputs=variant_examples, inputs=inputs, config=cfg, common=common,
                           compile=self.compile, forecast_calibration=self.forecast_calibration)
        if not policy.needs_branches:
            return policy.build(ctx)
        if inputs.timestep_index is None:
            follow = self._follower() if policy.follows_graph_breaks else None
            if follow is not None:
                common["follow"] = follow  # the blocks after a graph break follow the model's steps
                log.info("specdiff: a frame without the timestep follows the steps of the model's frame")
            elif self.pipeline_clock is not None and policy.follows_graph_breaks:
                # a block compiled on its own (regional compilation): the pipeline says the step
                common["clock"] = None  # nothing follows a block frame
                ctx.block_frame = True
                log.info("specdiff: a frame without the timestep (a block compiled on its own) takes its "
                         "steps from the pipeline's clock")
            elif self.pipeline_clock is not None:
                raise UnsupportedGraph(
                    f"no timestep input found: this frame holds part of the stack (a block compiled on its own, "
                    f"or blocks after a graph break) and policy {policy.name!r} needs the whole model's graph; "
                    "compile the whole model (compile_pipeline(pipe) without regional=True), or use policy "
                    "'fora' or 'taylor'")
            else:
                no_branches = not find_residual_branches(gm, frame_root_adds=True)
                raise (NothingToCache if no_branches else UnsupportedGraph)(
                    "no timestep input found (set SpecDiffConfig.timestep_input to its name; a block compiled on "
                    "its own, e.g. by diffusers' compile_repeated_blocks, takes its steps from the pipeline: "
                    "specdiff_fx.compile_pipeline(pipe, regional=True); if the model's "
                    "code breaks the graph, e.g. .tolist()/.item()/.cpu() in diffusers, the blocks run in a "
                    "frame that never sees the timestep: torch._dynamo.explain(model)(**inputs) shows where)"
                )
        # a frame that follows may be a block traced on its own after a graph break, so
        # adds in its own forward are residuals (find_residual_branches)
        ctx.branches = find_residual_branches(gm, frame_root_adds=inputs.timestep_index is None)
        if not ctx.branches:
            raise NothingToCache(NO_BRANCHES)
        log.info("specdiff: %d residual branches found (%s)", len(ctx.branches),
                 ", ".join(f"{k} {n}" for k, n in sorted(count_kinds(ctx.branches).items())))
        runtime = policy.build(ctx)
        log.info("specdiff: policy %s built variants %s", policy.name, sorted(runtime.variants))
        return runtime

    def _graph_inputs(self, gm: fx.GraphModule):
        inputs = find_graph_inputs(gm, self.config.timestep_input)
        if self.regional:
            # a block's input named like a timestep is its conditioning (PixArt's BasicTransformerBlock
            # takes the adaLN-single embedding as ``timestep``), never the denoising clock
            inputs = dataclasses.replace(inputs, timestep_index=None, timestep_name=None)
        return inputs

    def compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        gm = _for_context_parallel(gm)
        if self.config.compiler == "eager":
            return gm
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, _static_fakes(example_inputs), config_patches=dict(self.config.inductor_config) or None)

    def _fallback(self, gm: fx.GraphModule, example_inputs: Sequence[Any], reason: str,
                  deferred: bool = False, quiet: bool = False) -> CachingRuntime:
        try:  # a plain graph that has the timestep still counts the model's steps for its other graphs
            timestep_index = self._graph_inputs(gm).timestep_index
        except Exception:
            timestep_index = None
        # A frame without blocks (Lumina2's embedding frame, the frames around its graph break) is
        # no loss of caching when the model's other frames cache: they may compile after it, so the
        # runtime settles the warning at its next call (CachingRuntime.settle_fallback_warning).
        if not deferred and not quiet:
            warn_fallback(reason)
        if quiet:  # the caller caches another way (a dynamic graph built at each call's sizes)
            return CachingRuntime(policy=self.config.policy, variants={FULL: gm}, fallback=reason)
        runtime = CachingRuntime(
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
        if deferred:
            runtime.pending_warning = self._any_caching
        return runtime

    def _any_caching(self) -> bool:
        """Some graph this backend compiled caches (no fallback)."""
        return any(runtime.fallback is None for runtime in self.all_runtimes())

    def _follower(self) -> ClockFollower | None:
        """A view of the steps of the latest graph with a timestep (None if there is none)."""
        leader = self._leader() if self._leader is not None else None
        return ClockFollower(self.clock, leader) if leader is not None else None

    # ----------------------------------------------------------------- runtimes
    def _register(self, runtime: CachingRuntime, example_inputs: Sequence[Any]) -> None:
        if runtime.timestep_index is not None and runtime.clock is self.clock:
            self._leader = weakref.ref(runtime)
        params = frozenset(id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
        self._runtimes = [(r, p) for r, p in self._runtimes if r() is not None]
        self._runtimes.append((weakref.ref(runtime), params))

    def all_runtimes(self) -> list[CachingRuntime]:
        """Every live runtime this backend built, siblings included."""
        self._runtimes = [(r, p) for r, p in self._runtimes if r() is not None]
        return [rt for ref, _ in self._runtimes for rt in ref().all_runtimes()]

    def runtimes_for(self, model: torch.nn.Module) -> list[CachingRuntime]:
        """Every live runtime of ``model``: one per graph it compiled to (frames of a model
        whose code breaks the graph, calls of other shapes), oldest first.  Two modules through
        one graph each have their own (CachingRuntime.siblings)."""
        params = {p.data_ptr() for p in model.parameters() if p.data_ptr()}
        self._runtimes = [(r, p) for r, p in self._runtimes if r() is not None]
        found = []
        for ref, _ in self._runtimes:
            for runtime in ref().all_runtimes():
                if runtime.param_ptrs & params or (not runtime.param_ptrs and not params):
                    found.append(runtime)
        return found


class ShapeSpecialized:
    """What dynamo gets for a dynamic graph under a policy that builds at static sizes
    (``Policy.shape_general`` off: token-level specdiff; or variants that do not build at
    symbolic sizes).  Each call's sizes and int inputs (both become literals in a
    specialization), read where the graph's symbols come from (:class:`~specdiff_fx.buffers.ShapeBinding`), pick a runtime
    built on the graph specialized at those sizes (passes/specialize.py); the latest
    ``max_shapes`` are kept.  Dynamo sees one graph for every size, so its recompile limit is
    never what stops caching; each new size costs one build (with Inductor, a compile) inside
    the call that first brings it (docs/design.md, "Shape-general variants")."""

    max_shapes = 8

    def __init__(self, backend: SpecDiffBackend, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
        from collections import OrderedDict

        self.backend, self.gm = backend, gm
        # keyed on every symbol the graph computes with (an unused size, another each step,
        # would build a runtime per step)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        binding = ShapeBinding.of(_symbolic_fakes(gm, example_inputs)).each_once()
        self.binding = ShapeBinding(tuple(src for src in binding.sources
                                          if src[2] is not None or not is_unused_size(placeholders[src[1]])))
        self.scalars = scalar_inputs(gm)  # Python scalars dynamo made inputs: folded in, so keyed on
        self.runtimes: OrderedDict[tuple, CachingRuntime] = OrderedDict()
        self.builds = 0

    def __call__(self, *args: Any) -> Any:
        key = (self.binding.key(args), tuple(args[i].item() for i in self.scalars))
        runtime = self.runtimes.get(key)
        if runtime is None:
            self.builds += 1
            runtime = self.runtimes[key] = self.backend.specialized_runtime(self.gm, args)
            if len(self.runtimes) > self.max_shapes:  # the least recently served size goes
                self.runtimes.popitem(last=False)
        else:
            self.runtimes.move_to_end(key)
        return runtime(*args)


class ModelRuntime:
    """What ``get_runtime(model)`` returns: one view of every runtime a model compiled to.

    Attribute access goes to the *primary* runtime: the one that caches (no fallback) with the
    most residual branches, then the most calls, then the latest; a model compiled to one graph has just
    that one.  ``stats()`` and ``report()`` add a row per frame (graph), with fallbacks named,
    so a model whose code breaks the graph (HiDream, Lumina2, Qwen-Image) reports what each
    of its frames did; ``reset()`` and ``begin_trajectory()`` reach all of them."""

    def __init__(self, runtimes: Sequence[CachingRuntime]) -> None:
        if not runtimes:
            raise ValueError("a model view needs at least one runtime")
        self.runtimes = list(runtimes)
        ranked = sorted(enumerate(self.runtimes), key=lambda ir: (
            ir[1].fallback is None, ir[1].info.get("branches", 0), ir[1].stats()["calls"], ir[0]))
        self.primary = ranked[-1][1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["primary"], name)

    def frames(self) -> list[dict]:
        """A row per graph: modules that share one graph (blocks compiled on their own, one
        runtime each) are one row, with their count in ``modules`` and their calls summed;
        steps are the graph's first module's."""
        groups: dict[int, list[CachingRuntime]] = {}
        for runtime in self.runtimes:
            groups.setdefault(id(runtime.root), []).append(runtime)
        rows = []
        for i, members in enumerate(groups.values()):
            s = members[0].stats()
            rows.append({"frame": i, "primary": any(r is self.primary for r in members), "policy": s["policy"],
                         "fallback": s["fallback"], "branches": s.get("branches", 0), "modules": len(members),
                         "calls": sum(r.stats()["calls"] for r in members), "trajectories": s["trajectories"],
                         "steps": s["steps"], "cached_steps": s["cached_steps"], "clock": s.get("clock")})
        return rows

    def stats(self) -> dict:
        return {**self.primary.stats(), "frames": self.frames()}

    def report(self) -> str:
        from tabulate import tabulate

        text = self.primary.report()
        if len(self.runtimes) > 1:
            rows = [[f["frame"], "*" if f["primary"] else "", f["fallback"] or "-", f["branches"], f["modules"],
                     f["calls"], f["trajectories"], f"{f['steps']} ({f['cached_steps']} cached)"]
                    for f in self.frames()]
            text += "\n\nframes (graphs this model compiled to; * reported above)\n" + tabulate(
                rows, headers=["frame", "", "fallback", "branches", "modules", "calls", "trajectories", "steps"])
        return text

    def reset(self) -> None:
        for runtime in self.runtimes:
            runtime.reset()

    def begin_trajectory(self) -> None:
        """The next call starts a new trajectory, in every frame (docs/pipelines.md)."""
        for runtime in self.runtimes:
            runtime.begin_trajectory()


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


def _static_fakes(example_inputs: Sequence[Any]) -> list[Any]:
    """The example inputs to compile a variant with, its runtime-owned buffers as static fakes.

    Why: the buffers are real tensors dynamo never saw.  AOTAutograd would fakeify them in
    dynamo's fake mode with fresh symbolic sizes, which the first variant's compile then
    specializes -- unless that variant came from the cache, which compiles nothing.  So a warm
    process hashed the second variant with other input sizes than the cold one had stored it
    under, and missed (docs/pipelines.md, "Warm start").  Fakeified here with static shapes, every
    variant has the same cache key in every process."""
    from torch._guards import TracingContext, detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor

    context, fake_mode = TracingContext.try_get(), detect_fake_mode(example_inputs)
    if context is None or fake_mode is None:
        return list(example_inputs)
    return [fake_mode.from_tensor(x, static_shapes=True)
            if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) and x not in context.tensor_to_context
            else x for x in example_inputs]


def _is_dynamic(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Dynamo traced ``gm`` with symbolic sizes.  Its example inputs are the real tensors (a
    graph whose sizes are all tensor sizes has no SymInt among them): the placeholders' fake
    values say it."""
    values = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.find_nodes(op="placeholder")]
    return symbolic_inputs(example_inputs) or symbolic_inputs([v for v in values if v is not None])


def _symbolic_fakes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    """A dynamic graph's example inputs as fake tensors of the compile's fake mode, each of the
    symbolic sizes dynamo traced it with (its placeholder's fake value, remade in that mode: the
    two modes share one shape environment, so the symbols are the same): the variants' buffers
    are made in the same mode, of sizes in the same symbols, so verification and Inductor see
    one consistent set of sizes."""
    from torch._guards import TracingContext
    from torch._subclasses.fake_tensor import FakeTensor

    context = TracingContext.try_get()
    if context is None or context.fake_mode is None:
        raise UnsupportedGraph("a dynamic graph compiled outside dynamo's tracing context")
    mode = context.fake_mode
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    out = []
    for x, node in zip(example_inputs, placeholders):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(x, torch.Tensor) and not (isinstance(x, FakeTensor) and x.fake_mode is mode):
            if not isinstance(value, torch.Tensor):
                raise UnsupportedGraph(f"input {node.name!r} of a dynamic graph has no fake value")
            with mode:
                x = torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device=value.device,
                                        requires_grad=value.requires_grad)
        elif isinstance(value, torch.SymInt):
            x = value
        out.append(x)
    return out


def _sizes(value: torch.Tensor) -> tuple[int, ...]:
    """A fake value's sizes at the example call (a symbolic size's hint): a dynamic graph's output
    may write a size another way than its input (``2*(s0//2)`` for ``s0``), equal all the same."""
    return tuple(int(s.node.hint) if isinstance(s, torch.SymInt) and s.node.hint is not None else int(s)
                 for s in value.shape)


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
        if isinstance(value, torch.Tensor) and value.dim() == meta.dim() \
                and _sizes(value)[0] == _sizes(meta)[0] and _sizes(value)[2:] == _sizes(meta)[2:]:
            candidates.append(i)
    named = [i for i in candidates if "encoder" not in placeholders[i].name]
    return (named or [None])[0]


def make_backend(config: SpecDiffConfig | None = None, **overrides: Any) -> SpecDiffBackend:
    """A backend for ``config`` (default config if None), with field ``overrides`` applied."""
    config = config if config is not None else SpecDiffConfig()
    return SpecDiffBackend(config.replace(**overrides) if overrides else config)


specdiff_backend = SpecDiffBackend()
"""The backend with the default configuration; also registered as ``backend="specdiff"``."""


def compile_in_place(module: torch.nn.Module, backend: SpecDiffBackend, *, fullgraph: bool = False,
                     dynamic: bool | None = False) -> None:
    """``module.compile(backend=backend, ...)``; for a dynamic compile, each call traced with
    distinct size symbols for distinct sizes, and the call's size ints symbolic from the start.

    Why each choice of a dynamic compile:

    * Tensor sizes (of tensors in tuples, lists and dicts too) are dynamic from the first call
      and traced apart (no "duck sizing"): dynamo gives two sizes that are equal in the first
      call one symbol, and when the model then fixes one of them (a linear layer's input
      channels, 16) the other is fixed too: a first request whose token count equals a channel
      count (a 64 x 64 px Qwen-Image request, 16 tokens and 16 channels) compiles a graph for
      that token count alone, and the next size a second one.
    * Ints that are arguments of their own or sit in tuples (Qwen-Image's ``img_shapes``, a
      list of ``(frames, height, width)``; LTX's ``num_frames``/``height``/``width``) are sizes:
      symbolic from the first call (:func:`size_int_sources`).  Left to dynamo's automatic
      default they are traced as constants until they change, one int at a time, and each
      change compiles one more graph; with the token count tied to them, the first graph is
      also specialized to its token count.
    * Every other int (in a list, a dict, an attribute) stays a constant, as in a static
      compile: a new value compiles a new graph.  Dynamo 2.13 answers ``i in [s0]`` wrongly
      when ``s0`` is a symbolic int (SD3's skip-layer guidance, ``skip_layers=[0]`` traced as
      ``[s0]``, then skips no layer: a wrong image without a word), so a list of ints must
      never become symbolic, which dynamo's automatic default would make it on its second value.
    * Python floats stay specialized: traced as symbolic floats, dynamo turns them into 0-dim
      float32 tensors, and a guidance scale or a scheduler's sigma computed in float32 instead
      of Python's float64 changes the image in its last bits."""
    if dynamic is not True:
        module.compile(backend=backend, fullgraph=fullgraph, dynamic=dynamic)
        return
    module.compile(backend=backend, fullgraph=fullgraph, dynamic=None)
    from torch.fx.experimental import _config as shape_config

    compiled = module._compiled_call_impl
    try:
        parameters = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        parameters = []

    @functools.wraps(compiled)
    def call(*args: Any, **kwargs: Any) -> Any:
        for value in _nested_tensors((*args, *kwargs.values())):
            if value.dim():
                torch._dynamo.maybe_mark_dynamic(value, list(range(value.dim())))
        sources = ",".join(size_int_sources(args, kwargs, parameters))
        with shape_config.patch(use_duck_shape=False), \
                torch._dynamo.config.patch(specialize_float=True, specialize_int=True), \
                torch.compiler.config.patch(dynamic_sources=sources):
            return compiled(*args, **kwargs)

    call.specdiff_compiled = compiled
    module._compiled_call_impl = call


def _nested_tensors(value: Any):
    """The tensors in ``value``, however nested in tuples, lists and dicts (a block's
    ``image_rotary_emb=(cos, sin)``: sized by the token count like the hidden states)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _nested_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _nested_tensors(item)


def size_int_sources(args: Sequence[Any], kwargs: dict[str, Any], parameters: Sequence[str] = ()) -> list[str]:
    """Patterns for ``torch.compiler.config.dynamic_sources`` naming a call's size ints: ints
    passed as arguments of their own and ints inside tuples, however nested (in lists, dicts,
    tuples).  Ints in lists, sets or dicts that are not inside a tuple are indices or options
    (``skip_layers=[7, 8]``) and are left out (compile_in_place says why).

    Dynamo names a frame's inputs after the frame's locals: ``L['img_shapes'][0][0][1]`` in a
    plain ``forward``, ``L['kwargs']['img_shapes'][0][0][1]`` in a decorated one (diffusers'
    LoRA-scale wrapper), ``L['args'][2]`` for a positional one there; each pattern matches the
    path at the end of any such name."""
    out: list[str] = []

    def walk(value: Any, path: str, top: bool, in_tuple: bool) -> None:
        if type(value) is int:
            if top or in_tuple:
                out.append(f".*{re.escape(path)}$")
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]", False, True)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]", False, in_tuple)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and key.isidentifier():
                    walk(item, f"{path}[{key!r}]", False, in_tuple)

    for i, value in enumerate(args):
        walk(value, f"['args'][{i}]", True, False)
        if i < len(parameters):  # forward's own name for it, where the frame is forward itself
            walk(value, f"[{parameters[i]!r}]", True, False)
    for name, value in kwargs.items():
        walk(value, f"[{name!r}]", True, False)
    return out


def backend_of(model: Any) -> SpecDiffBackend:
    """The specdiff backend a model was compiled with: ``torch.compile(model, backend=...)``
    (an OptimizedModule) or ``model.compile(backend=...)`` in place (what compile_pipeline does)."""
    from torch._dynamo.eval_frame import OptimizedModule, _TorchDynamoContext, innermost_backend

    if isinstance(model, OptimizedModule):
        callback = model.dynamo_ctx.callback
    elif isinstance(model, torch.nn.Module) and getattr(model, "_compiled_call_impl", None) is not None:
        # nn.Module.compile keeps torch.compile(self._call_impl); its dynamo context is in the closure
        impl = model._compiled_call_impl
        impl = getattr(impl, "specdiff_compiled", impl)  # compile_in_place's call around it
        cells = getattr(impl, "__closure__", None) or ()
        contexts = [c.cell_contents for c in cells if isinstance(c.cell_contents, _TorchDynamoContext)]
        if not contexts:
            raise TypeError("could not find the backend of this in-place compiled module")
        callback = contexts[0].callback
    elif isinstance(model, torch.nn.Module) and any(_compiled_in_place(m) for m in model.modules()):
        # regional compilation: the model's blocks are compiled, each in place, by one backend
        backends = []
        for m in model.modules():
            if _compiled_in_place(m):
                b = backend_of(m)
                if all(b is not seen for seen in backends):
                    backends.append(b)
        if len(backends) > 1:
            raise TypeError(f"this model's blocks were compiled with {len(backends)} specdiff backends; "
                            "call get_runtime on one block")
        return backends[0]
    else:
        raise TypeError("get_runtime expects a model compiled with a specdiff backend: the module returned by "
                        "torch.compile(model, backend=...), or one compiled in place (model.compile(...), "
                        "specdiff_fx.compile_pipeline)")
    backend = innermost_backend(callback)
    backend = getattr(backend, "compiler_fn", backend)  # torch.compile's _TorchCompileWrapper
    if not isinstance(backend, SpecDiffBackend):
        raise TypeError(f"this model was compiled with backend {backend!r}, not a specdiff backend")
    return backend


def _compiled_in_place(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def get_runtime(compiled_model: Any) -> ModelRuntime:
    """Every runtime behind ``compiled_model`` as one view (:class:`ModelRuntime`): attributes
    of the runtime that caches most, ``stats()``/``report()`` with a row per frame."""
    backend = backend_of(compiled_model)
    model = getattr(compiled_model, "_orig_mod", compiled_model)
    runtimes = backend.runtimes_for(model)
    if not runtimes:
        raise LookupError("no specdiff runtime yet: call the compiled model once first")
    return ModelRuntime(runtimes)
