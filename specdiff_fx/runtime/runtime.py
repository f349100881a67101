"""The callable handed back to dynamo: picks a compiled variant per call and owns the caches.

All step state lives here, in plain Python around the compiled graphs, never on the
module: dynamo would guard on it and recompile every step.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections import deque
from typing import Any, Callable, Sequence

import torch

from ..buffers import BufferSpec
from .cache_slots import CacheSlots
from .cuda_graphs import CudaGraphVariant
from .schedule import AlwaysFull
from .step_tracker import ClockFollower, StepClock, StepTracker

FULL = "full"
REUSE = "reuse"


def _signature(args: Sequence[Any], indices: Sequence[int]) -> tuple:
    sig = []
    for i in indices:
        a = args[i]
        if isinstance(a, torch.Tensor):
            sig.append((tuple(a.shape), a.dtype, a.device))
        else:
            sig.append((type(a), a))
    return tuple(sig)


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
    """A compiled variant that adds its wall time to its runtime's per-call clock, so the
    runtime's own Python (host work) per call is the call's time minus the variants' time."""

    __slots__ = ("fn", "clock")

    def __init__(self, fn: Callable, clock: list[float]) -> None:
        self.fn, self.clock = fn, clock

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.clock[0] += time.perf_counter() - start


class SpecDiffRuntime:
    """Runs one dynamo graph's variants across denoising steps.

    ``variants`` maps ``"full"`` (and, for caching policies, ``"reuse"``) to compiled
    callables taking the graph inputs followed by the cache buffers of ``buffer_specs``.
    """

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
        timestep_direction: str = "down",
        clock: StepClock | None = None,
        follow: ClockFollower | None = None,
        cudagraphs: bool = False,
    ) -> None:
        if FULL not in variants:
            raise ValueError("a runtime needs a 'full' variant")
        self.policy = policy
        self._variant_clock = [0.0]  # seconds spent inside compiled variants during this call
        if cudagraphs:  # one capture per cache slot (runtime/cuda_graphs.py)
            num_inputs = len(example_inputs) if example_inputs else None
            variants = {name: CudaGraphVariant(fn, num_inputs, name) for name, fn in variants.items()}
        self._cuda_graphs = {name: fn for name, fn in variants.items() if isinstance(fn, CudaGraphVariant)}
        self.variants = {name: _TimedVariant(fn, self._variant_clock) for name, fn in variants.items()}
        self.schedule = schedule if schedule is not None else AlwaysFull()
        self.timestep_index = timestep_index
        self.signature_indices = list(signature_indices)
        self.fallback = fallback
        self.info = dict(info or {})
        self.graphs = dict(graphs or {})  # the FX graphs behind each variant, for inspection
        self.slots = CacheSlots(list(buffer_specs))
        self.tracker = StepTracker(timestep_direction)
        # graph breaks: a graph with the timestep publishes its steps on ``clock``; a graph
        # without it follows them (``follow``) instead of reading a timestep
        self.clock = clock
        self.follow = follow
        self._signature = _signature(example_inputs, self.signature_indices) if example_inputs else None
        self._reset_stats()

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: Any) -> Any:
        if self.fallback is not None or (self.timestep_index is None and self.follow is None):
            if self.clock is not None and self.timestep_index is not None:
                # a plain graph that still counts the model's steps for its other graphs
                self.clock.publish(self, self.tracker.observe(self._read_timestep(args)))
            return self.variants[FULL](*args)
        start = time.perf_counter()
        self._variant_clock[0] = 0.0
        sig = _signature(args, self.signature_indices)
        if sig != self._signature:
            # Dynamo guards make this rare; with dynamic shapes it is the last line of defence.
            self._signature = sig
            self.invalidate()
        if self.follow is not None:
            event = self.follow.event()
            if event is None:  # no step of our own leader to follow: never read a cache
                slot = self.slots[-1]
                slot.invalidate()
                return self.variants[FULL](*args, *slot.buffers)
        else:
            event = self.tracker.observe(self._read_timestep(args))
            if self.clock is not None:
                self.clock.publish(self, event)
        out, kind, details = self._run_step(args, event)
        self._record(event, kind, details)
        self._host_s.append(time.perf_counter() - start - self._variant_clock[0])
        return out

    def invalidate(self) -> None:
        """Drop every cache; the next call starts a new trajectory."""
        self.slots.clear()
        self.tracker.invalidate()
        self._invalidations += 1

    def _run_step(self, args: Sequence[Any], event) -> tuple[Any, str, dict | None]:
        """Branch-level policy: reuse every cached branch output between full steps."""
        slot = self.slots[event.slot]
        use_cache = (
            REUSE in self.variants
            and not self.schedule.is_full(event.step)
            and slot.valid_for(event.trajectory)
        )
        kind = REUSE if use_cache else FULL
        out = self.variants[kind](*args, *slot.buffers)
        if kind == FULL:
            slot.stamp(event.trajectory, event.step)
        return out, kind, None

    def _read_timestep(self, args: Sequence[Any]) -> float:
        t = args[self.timestep_index]
        if isinstance(t, torch.Tensor):
            return float(t.detach().reshape(-1)[0])
        return float(t)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every cache and all step state; the next call starts a new trajectory."""
        self.slots.clear()
        self.tracker.reset()
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._calls = 0
        self._steps = 0
        self._trajectories = 0
        self._cached_steps = 0
        self._invalidations = 0
        self._plan: list[dict] = []
        self._host_s: deque[float] = deque(maxlen=4096)  # host seconds of the latest calls

    def _record(self, event, kind: str, details: dict | None = None) -> None:
        self._calls += 1
        if event.new_trajectory:
            self._trajectories += 1
            self._plan = []
        if event.new_step:
            self._steps += 1
            self._plan.append({"step": event.step, "timestep": event.timestep, "calls": []})
        entry = self._plan[-1]
        if kind != FULL and all(c == FULL for c in entry["calls"]):
            self._cached_steps += 1
        entry["calls"].append(kind)
        if details:
            entry.setdefault("details", []).append(details)

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
            "cache_slots": len(self.slots._slots),
            "cache_bytes": self.slots.allocated_bytes,
            "plan": [_plain_entry(e) for e in self._plan],
            "host_ms_per_call": self._host_stats(),
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
        """The runtime-owned buffers ``variant`` is called with, after the graph inputs."""
        if variant not in self.variants:
            raise KeyError(f"no variant {variant!r}; have {sorted(self.variants)}")
        return list(self.slots.specs) if self.fallback is None else []

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
    warnings.warn(
        f"specdiff: compiling this graph without caching (plain compile): {reason}",
        RuntimeWarning,
        stacklevel=3,
    )
