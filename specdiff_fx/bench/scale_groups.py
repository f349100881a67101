"""What ``specdiff-fx scale`` times per policy: each policy's compiled variants called directly
on the buffers its runtime hands them (``runtime.buffers_for(variant, slot)``, the same for every
policy), grouped so each group is timed together with the plain step; and the plain Inductor
compile of the same graph they are compared with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

@dataclass
class Group:
    """Kinds timed together (with the plain step) after one compile."""
    name: str
    kinds: dict[str, Callable[[], Any]] = field(default_factory=dict)
    ideal: dict[str, float] = field(default_factory=dict)
    held_bytes: int = 0
    info: dict = field(default_factory=dict)


def _raw(runtime, kind: str) -> Callable:
    """The compiled variant itself, without the runtime's host-time clock around it."""
    fn = runtime.variants[kind]
    return getattr(fn, "fn", fn)


def fora_group(gm, inputs, compiler: str, cfg_extra: dict) -> Group:
    from ..backend import make_backend

    runtime = make_backend(policy="fora", compiler=compiler, **cfg_extra).build_runtime(gm, inputs)
    if runtime.fallback:
        raise RuntimeError(f"fora fell back: {runtime.fallback}")
    record, cached = runtime.buffers_for("full", 0), runtime.buffers_for("reuse", 0)
    full, reuse = _raw(runtime, "full"), _raw(runtime, "reuse")
    with torch.no_grad():
        full(*inputs, *record)
    held = runtime.slot(0).nbytes
    return Group("fora", {"fora_full_record": lambda: full(*inputs, *record),
                          "fora_reuse": lambda: reuse(*inputs, *cached)},
                 {"fora_full_record": 1.0, "fora_reuse": 0.0}, held_bytes=held,
                 info={"cache_bytes": held, "branches": runtime.info.get("branches")})


def specdiff_group(gm, inputs, compiler: str, ratio: float, with_full: bool, draft: bool,
                   cfg_extra: dict) -> Group:
    from ..backend import make_backend

    runtime = make_backend(policy="specdiff", compiler=compiler, cache_ratio=ratio,
                           draft_steps=2 if draft else 0, **cfg_extra).build_runtime(gm, inputs)
    if runtime.fallback:
        raise RuntimeError(f"specdiff fell back: {runtime.fallback}")
    slot = runtime.slot(0)
    record, partial = runtime.buffers_for("full", 0), runtime.buffers_for("partial", 0)
    full_fn, partial_fn = _raw(runtime, "full"), _raw(runtime, "partial")
    with torch.no_grad():
        full_fn(*inputs, *record)  # fills the K/V caches and history, as a full step would
    # the partial variant picks its own tokens (passes/token_select.py) from the scores just recorded
    slot.find("mix_weights").copy_(torch.tensor([0.6, 0.3, 0.1]))
    tag = f"specdiff_partial_cr{ratio:g}"
    group = Group(f"specdiff cr {ratio:g}", {tag: lambda: partial_fn(*inputs, *partial)},
                  {tag: runtime.k / runtime.n}, held_bytes=slot.nbytes,
                  info={"cache_bytes": slot.nbytes, "kv_cache_bytes": slot.nbytes_of("kv"), "subset_tokens": runtime.k,
                        "image_tokens": runtime.n, "flops": dict(runtime.flops)})
    if with_full:
        group.kinds["specdiff_full_record"] = lambda: full_fn(*inputs, *record)
        group.ideal["specdiff_full_record"] = 1.0
    if draft and "draft" in runtime.variants:
        draft_fn, draft_buffers = _raw(runtime, "draft"), runtime.buffers_for("draft", 0)
        group.kinds["specdiff_draft"] = lambda: draft_fn(*inputs, *draft_buffers)
        group.ideal["specdiff_draft"] = 1.0
    return group


def taylor_group(gm, inputs, compiler: str, lite: bool, cfg_extra: dict) -> Group:
    """Record and forecast steps of policy taylor, lite (chains of blocks) or per branch."""
    from ..backend import make_backend

    mode = "lite" if lite else "branch"
    runtime = make_backend(policy="taylor", lite=lite, compiler=compiler, **cfg_extra).build_runtime(gm, inputs)
    if runtime.fallback:
        raise RuntimeError(f"taylor ({mode}) fell back: {runtime.fallback}")
    recorded, forecast_buffers = runtime.buffers_for("full", 0), runtime.buffers_for("forecast", 0)
    record, forecast = _raw(runtime, "full"), _raw(runtime, "forecast")
    with torch.no_grad():
        record(*inputs, *recorded)  # fills the Taylor terms, as a full step would
    rec, fc = f"taylor_{mode}_record", f"taylor_{mode}_forecast"
    held = runtime.slot(0).nbytes
    return Group(f"taylor {mode}", {rec: lambda: record(*inputs, *recorded),
                                    fc: lambda: forecast(*inputs, *forecast_buffers)},
                 {rec: 1.0, fc: 0.0}, held_bytes=held,
                 info={"cache_bytes": held, "lite": lite,
                       "branches": runtime.info.get("branches"),
                       "forecast_targets": runtime.info.get("forecast_targets")})


def compile_plain(gm, inputs, patches: dict):
    """Plain Inductor on (a copy of) the same graph: the step every kind is a share of."""
    from torch._inductor.compile_fx import compile_fx

    from ..passes.graph_copy import copy_graph_module

    with torch.no_grad():
        return compile_fx(copy_graph_module(gm), list(inputs), config_patches=dict(patches) or None)
