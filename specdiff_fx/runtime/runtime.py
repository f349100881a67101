"""The callable handed back to dynamo: picks a compiled variant per call and owns the caches.

All step state lives here, in plain Python around the compiled graphs, never on the
module: dynamo would guard on it and recompile every step.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from collections import deque
from typing import Any, Callable, Sequence

import torch

from ..buffers import BufferSpec, ShapeBinding
from ..variants import FULL, REUSE
from .cuda_graphs import CudaGraphVariant
from .events import EventSource, event_source
from .pipeline_clock import PipelineClock
from .schedule import AlwaysFull, FullStepSchedule, TrajectoryProgress
from .slots import SlotState, Slots
from .step_tracker import ClockFollower, StepClock

log = logging.getLogger("specdiff_fx")

MAX_SIBLINGS = 512
"""Other modules through one graph with state of their own (the oldest is dropped beyond it).
Regional compilation sends every block of a stack through one graph (FLUX: 57, Qwen-Image: 60),
so the bound is far above any model's block count; it only keeps modules that are gone from
holding caches forever."""


def _signature(args: Sequence[Any], indices: Sequence[int], tensors_only: bool = False) -> tuple:
    """What a call's cached state is valid for.  A dynamic graph's Python numbers are inputs that
    change per call (an int timestep, a guidance scale), not a new graph: ``tensors_only``."""
    sig = []
    for i in indices:
        a = args[i]
        if isinstance(a, torch.Tensor):
            sig.append((tuple(a.shape), a.dtype, a.device))
        elif not tensors_only:
            sig.append((type(a), a))
    return tuple(sig)


def _owner_key(args: Sequence[Any], index: int | None) -> int | None:
    if index is None or not isinstance(args[index], torch.Tensor):
        return None
    return args[index].data_ptr() or None


def _plain_entry(entry: dict) -> dict:
    """A plan entry with tensor-valued details turned into rounded floats."""
    out = dict(entry, calls=list(entry["calls"]))
    if "details" in entry:
        out["details"] = [
            {k: round(float(v), 1) if isinstance(v, torch.Tensor) else v for k, v in d.items()}
            for d in entry["details"]
        ]
    return out


class _TimedVariant:
    """A compiled variant that adds its wall time to its runtime's per-call counter, so the
    runtime's own Python (host work) per call is the call's time minus the variants' time."""

    __slots__ = ("fn", "seconds")

    def __init__(self, fn: Callable, seconds: list[float]) -> None:
        self.fn, self.seconds = fn, seconds

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds[0] += time.perf_counter() - start


class CachingRuntime:
    """Runs one dynamo graph's variants across denoising steps: the base of every policy's
    runtime (policy ``off`` and ``fora`` use it as it is).

    ``variants`` maps ``"full"`` (and, for caching policies, ``"reuse"``) to compiled
    callables taking the graph inputs followed by the cache buffers of ``buffer_specs``.
    Each call slot's buffers and state are one :class:`SlotState` (runtime/slots.py); a
    subclass with state of its own per slot sets :attr:`slot_state` to its factory.
    """

    slot_state: Callable[[], Any] | None = None
    """Makes the policy's own state of one call slot (None: buffers and stamp only)."""

    def __init__(
        self,
        *,
        policy: str,
        variants: dict[str, Callable],
        buffer_specs: Sequence[BufferSpec] = (),
        schedule: Any = None,
        timestep_index: int | None = None,
        signature_indices: Sequence[int] = (),
        example_inputs: Sequence[Any] = (),
        fallback: str | None = None,
        info: dict | None = None,
        graphs: dict | None = None,
        timestep_direction: str = "auto",
        clock: StepClock | None = None,
        follow: ClockFollower | None = None,
        cudagraphs: bool = False,
        latent_index: int | None = None,
        pipeline_clock: PipelineClock | None = None,
        shape_binding: ShapeBinding | None = None,
    ) -> None:
        if FULL not in variants:
            raise ValueError("a runtime needs a 'full' variant")
        self.policy = policy
        self._variant_seconds = [0.0]  # seconds spent inside compiled variants during this call
        if cudagraphs:  # one capture per cache slot (runtime/cuda_graphs.py)
            num_inputs = len(example_inputs) if example_inputs else None
            variants = {name: CudaGraphVariant(fn, num_inputs, name) for name, fn in variants.items()}
        self._cuda_graphs = {name: fn for name, fn in variants.items() if isinstance(fn, CudaGraphVariant)}
        self.variants = {name: _TimedVariant(fn, self._variant_seconds) for name, fn in variants.items()}
        self.schedule = schedule if schedule is not None else AlwaysFull()
        self.timestep_index = timestep_index
        self.latent_index = latent_index
        self.signature_indices = list(signature_indices)
        self.fallback = fallback
        self.info = dict(info or {})
        self.graphs = dict(graphs or {})  # the FX graphs behind each variant, for inspection
        self.buffer_specs = list(buffer_specs)
        # a dynamic graph's sizes, read off each call (buffers.py): buffers sized per call; only
        # the sizes the buffers use (a SymInt input may be a timestep, not a size)
        self.shape_binding = shape_binding.only(self.buffer_specs) if shape_binding is not None else None
        # the runtime-owned buffers each variant is called with (subclasses set their own)
        self._variant_specs = {name: self.buffer_specs if fallback is None else [] for name in self.variants}
        self.timestep_direction = timestep_direction
        # graph breaks: a graph with the timestep publishes its steps on ``clock``; a graph
        # without it follows them (``follow``) instead of reading a timestep
        self.clock = clock
        # the pipeline's own clock (compile_pipeline); None: inferred from the inputs
        self.pipeline_clock = pipeline_clock
        # where this frame's step events come from, chosen once (runtime/events.py): each
        # runtime state (reset, a sibling) makes its own; None: a plain frame with no steps
        self._event_source = event_source(timestep_index=timestep_index, latent_index=latent_index,
                                          direction=timestep_direction, follow=follow,
                                          pipeline_clock=pipeline_clock)
        # One runtime per compiled module: two modules of one class through one backend share
        # dynamo's graph (their parameters are its inputs), so the parameters say whose call it is.
        self._param_index = next((i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)),
                                 None)
        self.owner = _owner_key(example_inputs, self._param_index)
        self.param_ptrs = frozenset(x.data_ptr() for x in example_inputs
                                    if isinstance(x, torch.nn.Parameter) and x.data_ptr())
        self.siblings: dict[int, CachingRuntime] = {}
        self.root = self  # the runtime dynamo called; a sibling's root is the one it was made from
        # a dynamic graph's first call sets the sizes its buffers are allocated at
        self._initial_signature = (_signature(example_inputs, self.signature_indices)
                                   if example_inputs and shape_binding is None else None)
        self._warned: set[str] = set()
        # a fallback whose warning waits for the model's other frames: asked at the next call
        # whether any of them caches (backend._fallback); None: said already, or nothing to say
        self.pending_warning: Callable[[], bool] | None = None
        self._plain_calls = 0
        self._init_state()

    def _init_state(self) -> None:
        """Every piece of state one model's calls build up (caches, the inferred clock, stats).
        reset() and a sibling runtime (another module through the same graph) start from here."""
        self.slots = Slots(self.slot_state)
        self.progress = TrajectoryProgress(self.timestep_direction)
        self.events: EventSource | None = self._event_source() if self._event_source is not None else None
        self._signature = self._initial_signature
        self._reset_stats()

    def _sibling(self, owner: int, args: Sequence[Any]) -> "CachingRuntime":
        """The runtime of another module that reaches this graph: the same compiled variants,
        state of its own (never a cache of this module's)."""
        sibling = self.siblings.get(owner)
        if sibling is None:
            sibling = copy.copy(self)
            sibling.siblings = {}
            sibling.root = self
            sibling.owner = owner
            sibling.param_ptrs = frozenset(a.data_ptr() for a in args
                                           if isinstance(a, torch.nn.Parameter) and a.data_ptr())
            sibling._warned = set()
            sibling.pending_warning = None  # the frame's warning is the root's to settle
            sibling._init_state()
            if len(self.siblings) >= MAX_SIBLINGS:  # modules that are gone keep no caches alive
                self.siblings.pop(next(iter(self.siblings)))
            self.siblings[owner] = sibling
            log.info("specdiff: another module through this %s graph gets its own runtime state", self.policy)
        return sibling

    def settle_fallback_warning(self) -> None:
        """This frame has no residual branches.  If the model's other frames cache (its blocks,
        after a graph break), that is a frame without blocks: an INFO line, and ``report()``'s
        frames table names it.  If none does, caching is off for the model: the warning."""
        others_cache, self.pending_warning = self.pending_warning, None
        if others_cache():
            log.info("specdiff: a frame without residual branches (%s); the model's other frames cache",
                     self.fallback)
        else:
            warn_fallback(self.fallback)

    def all_runtimes(self) -> list["CachingRuntime"]:
        """This runtime and the siblings made for other modules through the same graph."""
        return [self, *self.siblings.values()]

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: Any) -> Any:
        if self.pipeline_clock is not None:
            self.pipeline_clock.reached()
        if self.owner is not None:
            owner = args[self._param_index].data_ptr()
            if owner != self.owner:
                return self._sibling(owner, args)(*args)
        if self.fallback is not None or self.events is None:
            if self.pending_warning is not None:
                if self._plain_calls:
                    self.settle_fallback_warning()
                self._plain_calls += 1
            if self.events is not None and self.events.leads and self.clock is not None:
                # a plain graph that still counts the model's steps for its other graphs
                event = self.events.event(self, args)
                self.clock.publish(self.root, event)
                self._record(event, FULL)
            return self.variants[FULL](*args)
        start = time.perf_counter()
        self._variant_seconds[0] = 0.0
        sig = _signature(args, self.signature_indices, tensors_only=self.shape_binding is not None)
        if self.shape_binding is not None:
            sig = (sig, self.shape_binding.key(args))
        if sig != self._signature:
            # A static graph: dynamo's guards make this rare, the last line of defence.  A dynamic
            # graph: another request's sizes, whose buffers are of other sizes.
            self._signature = sig
            self.invalidate()
            if self.shape_binding is not None:
                self.slots.sizes = self.shape_binding.sizes(args)
        event = self.events.event(self, args)
        if event is None:  # no step to place the call in (no leader's step, no pipeline trajectory)
            return self._run_uncached(args)
        if self.events.leads and self.clock is not None:
            self.clock.publish(self.root, event)
        out, kind, details = self._run_step(args, event)
        self._record(event, kind, details)
        self._host_s.append(time.perf_counter() - start - self._variant_seconds[0])
        return out

    def _run_uncached(self, args: Sequence[Any]) -> Any:
        """A call with no step to place it in: the full variant on a scratch slot, never a cache read."""
        slot = self.slots[-1]
        slot.invalidate()
        return self.variants[FULL](*args, *slot.buffers(self._variant_specs[FULL]))

    @property
    def clock_source(self) -> str | None:
        """Where the latest step event came from (``stats()["clock"]``): ``"pipeline"``,
        ``"inferred"``, ``"leader frame"``; None before the first or for a plain frame."""
        return self.events.name if self.events is not None else None

    def begin_trajectory(self) -> None:
        """Start a new trajectory at the next call: for a loop of one's own where the inputs
        cannot show it (a short refine call right after a full one, docs/pipelines.md)."""
        self.invalidate()

    def invalidate(self) -> None:
        """Drop every cache; the next call starts a new trajectory."""
        self.slots.clear()
        self.progress.reset()
        if self.events is not None:
            self.events.invalidate()
        self._invalidations += 1

    def _run_step(self, args: Sequence[Any], event) -> tuple[Any, str, dict | None]:
        """Branch-level policy: reuse every cached branch output between full steps."""
        slot = self.slots[event.slot]
        use_cache = (
            REUSE in self.variants
            and not self.schedule.is_full(event.step, *self._progress(event))
            and slot.valid_for(event.trajectory)
        )
        kind = REUSE if use_cache else FULL
        out = self.variants[kind](*args, *slot.buffers(self._variant_specs[kind]))
        if kind == FULL:
            slot.stamp(event.trajectory, event.step)
        return out, kind, None

    def _progress(self, event) -> tuple[float | None, float | None]:
        """This step's and the previous step's progress (runtime/schedule.py).  A schedule with
        ``full_at`` on a clock without timesteps cannot place its points: said once, and its
        other full steps (warm-up, interval, reset steps) still run."""
        progress, previous = self.progress.at(event)
        if progress is None and getattr(self.schedule, "full_at", ()) and "no progress" not in self._warned:
            self._warned.add("no progress")
            warnings.warn("specdiff: full_at needs each call's timestep to place its points, and this frame's clock "
                          "has none (a block compiled on its own whose scheduler has no timestep list): only the "
                          "warm-up, interval and reset steps run full", RuntimeWarning, stacklevel=5)
        return progress, previous

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every cache and all step state; the next call starts a new trajectory."""
        self._init_state()

    def _reset_stats(self) -> None:
        self._calls = 0
        self._steps = 0
        self._trajectories = 0
        self._cached_steps = 0
        self._invalidations = 0
        self._plan: list[dict] = []
        self._trajectory_steps: deque[int] = deque(maxlen=8)
        self._host_s: deque[float] = deque(maxlen=4096)  # host seconds of the latest calls

    def _record(self, event, kind: str, details: dict | None = None) -> None:
        self._calls += 1
        if event.new_trajectory:
            self._check_clock()
            self._trajectories += 1 + getattr(event, "skipped", 0)
            self._plan = []
            self._trajectory_steps.append(0)
        if event.new_step or not self._plan:  # a graph compiled mid-step joins where it is
            self._steps += 1
            self._plan.append({"step": event.step, "timestep": event.timestep, "calls": []})
            if self._trajectory_steps:
                self._trajectory_steps[-1] += 1
        entry = self._plan[-1]
        if kind != FULL and all(c == FULL for c in entry["calls"]):
            self._cached_steps += 1
        entry["calls"].append(kind)
        if details:
            entry.setdefault("details", []).append(details)

    def _check_clock(self) -> None:
        """Warn once when an inferred clock looks wrong (runtime/step_tracker.py says what the
        inputs cannot show)."""
        if self.clock_source != "inferred" or not isinstance(self.schedule, FullStepSchedule):
            return
        recent = list(self._trajectory_steps)[-3:]
        if len(recent) == 3 and all(n <= 2 for n in recent) and "short" not in self._warned:
            self._warned.add("short")
            warnings.warn(
                "specdiff: the clock inferred from timesteps sees trajectories of 1-2 steps in a row, so "
                "nothing is cached; if these calls are steps of one trajectory, drive the model through "
                "specdiff_fx.compile_pipeline(pipe) or call get_runtime(model).begin_trajectory() where a "
                "trajectory starts (docs/pipelines.md)", RuntimeWarning, stacklevel=4)
        # a schedule that asks for every step of long trajectories full (the tuner's reference
        # runs, warmup_steps=num_steps) explains them; short ones may be a clock's mistake
        asked = bool(recent) and min(recent) >= 12 and (
            self.schedule.interval == 1 or all(self.schedule.warmup_steps >= n for n in recent))
        if self._steps >= 12 and self._cached_steps == 0 and not asked and "uncached" not in self._warned:
            self._warned.add("uncached")
            warnings.warn(
                f"specdiff: {self._steps} steps and none cached: the clock inferred from timesteps may not "
                "match the sampler (docs/pipelines.md; compile_pipeline(pipe) takes it from the pipeline)",
                RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        return {
            "policy": self.policy,
            "fallback": self.fallback,
            "calls": self._calls,
            "steps": self._steps,
            "trajectories": self._trajectories,
            "full_steps": self._steps - self._cached_steps,
            "cached_steps": self._cached_steps,
            "invalidations": self._invalidations,
            "clock": self.clock_source,
            "cache_slots": len(self.slots),
            "cache_bytes": self.slots.nbytes,
            "plan": [_plain_entry(e) for e in self._plan],
            "host_ms_per_call": self._host_stats(),
            # steps of the pipeline that reached no compiled graph (runtime/pipeline_clock.py)
            "uncompiled_steps": self.pipeline_clock.uncompiled_steps if self.pipeline_clock is not None else 0,
            **self._extra_stats(),
            **self._cuda_graph_stats(),
            **self.info,
        }

    def _cuda_graph_stats(self) -> dict:
        if not self._cuda_graphs:
            return {}
        return {"cuda_graphs": {name: {"captures": v.captures, "replays": v.replays, "off": v.failed}
                                for name, v in self._cuda_graphs.items()}}

    def _host_stats(self) -> dict:
        """The runtime's own Python per call (step detection, scores, bookkeeping; on CUDA also
        any device-to-host read), excluding time inside the compiled variants."""
        if not self._host_s:
            return {"mean": None, "median": None, "max": None, "calls": 0}
        ms = [s * 1000.0 for s in self._host_s]
        return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "max": max(ms), "calls": len(ms)}

    def _extra_stats(self) -> dict:
        return {}

    def buffer_specs_for(self, variant: str) -> list[BufferSpec]:
        """The descriptions of the runtime-owned buffers ``variant`` is called with, after the
        graph inputs."""
        if variant not in self.variants:
            raise KeyError(f"no variant {variant!r}; have {sorted(self.variants)}")
        return list(self._variant_specs[variant])

    def slot(self, index: int) -> SlotState:
        """The state of call slot ``index`` (0: a step's first call; made on first use)."""
        return self.slots[index]

    def buffers_for(self, variant: str, slot: int = 0) -> list[Any]:
        """The buffers ``variant`` is called with in call slot ``slot``, in its order
        (allocated on first use): what a benchmark or a test passes to the compiled variant."""
        if variant not in self.variants:
            raise KeyError(f"no variant {variant!r}; have {sorted(self.variants)}")
        return list(self.slots[slot].buffers(self._variant_specs[variant]))

    def report(self) -> str:
        from tabulate import tabulate

        s = self.stats()
        head = [
            ["policy", s["policy"]],
            ["fallback", s["fallback"] or "-"],
            ["trajectories", s["trajectories"]],
            ["steps (full / cached)", f"{s['steps']} ({s['full_steps']} / {s['cached_steps']})"],
            ["calls", s["calls"]],
            ["cache memory", f"{s['cache_bytes'] / 2**20:.2f} MiB in {s['cache_slots']} slot(s)"],
        ]
        if s["uncompiled_steps"]:
            head.append(["steps run uncompiled", f"{s['uncompiled_steps']} (no compiled graph reached: recompile "
                                                  "limit or an eager frame)"])
        for key in ("branches", "branch_kinds", "draft_steps", "partial_steps", "image_tokens",
                    "subset_tokens", "attention_sites"):
            if key in s:
                head.append([key, s[key]])
        plan = []
        for e in s["plan"]:
            row = [e["step"], f"{e['timestep']:.2f}", " ".join(e["calls"])]
            d = (e.get("details") or [{}])[0]
            row += [d.get("c1", ""), d.get("c2", ""), d.get("c3", ""),
                    f"{d['est_flops_saved']:.0%}" if "est_flops_saved" in d else ""]
            plan.append(row)
        text = tabulate(head, tablefmt="simple")
        if plan:
            text += "\n\nlatest trajectory\n" + tabulate(
                plan, headers=["step", "timestep", "calls", "C1", "C2", "C3", "FLOPs saved"])
        return text


def warn_fallback(reason: str) -> None:
    log.info("specdiff: fallback to a plain compile: %s", reason)
    warnings.warn(
        f"specdiff: compiling this graph without caching (plain compile): {reason}",
        RuntimeWarning,
        stacklevel=3,
    )
