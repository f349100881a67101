"""What a bench row runs: the workload, the prepared denoiser of one method, and our own methods.

A :class:`Method` builds a :class:`Prepared` denoiser for a :class:`Workload`; the runner in
:mod:`specdiff_fx.bench.command` times it, measures it and turns it into a row.  Our policies
(and the uncached baseline) are here; third-party caches are in :mod:`specdiff_fx.bench.anchors`.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

COMPILERS = ("inductor", "eager", "none")


class SkipMethod(Exception):
    """The method cannot run here (package missing, model not supported); the row says why."""


@dataclass
class Workload:
    """Everything a method needs to build itself; the same for every row of one run."""

    model: torch.nn.Module  # ClassConditionalMMDiT
    num_steps: int
    guidance_scale: float
    device: torch.device
    compiler: str  # "inductor" | "eager" | "none" (see command.py)
    groups: list[tuple[torch.Tensor, torch.Tensor]]  # (labels, noise) per sample() call
    calibration_groups: list[tuple[torch.Tensor, torch.Tensor]]  # other seeds, for anchors' tuning
    options: dict = field(default_factory=dict)  # anchor options from the command line

    def run_group(self, denoiser: Callable, group, callback: Callable | None = None) -> torch.Tensor:
        """One CFG sampling call (batch_cfg: one denoiser call per step)."""
        from ..reference.model import sample

        labels, noise = group
        return sample(self.model, labels, num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                      transformer=denoiser, batch_cfg=True, device=self.device, noise=noise,
                      callback=callback)

    def compile(self, module: torch.nn.Module, fullgraph: bool) -> Callable:
        """Plain torch.compile with the run's compiler (``none``: the module as is)."""
        if self.compiler == "none":
            return module
        return torch.compile(module, backend=self.compiler, fullgraph=fullgraph, dynamic=False)

    @property
    def compile_note(self) -> str:
        return {"inductor": "torch.compile(inductor)", "eager": "torch.compile(eager)",
                "none": "not compiled"}[self.compiler]


@dataclass
class StepCounts:
    """Denoiser steps seen and how many of them ran the full network (and partially, ours)."""

    steps: int = 0
    full: int = 0
    partial: int = 0

    def __sub__(self, other: "StepCounts") -> "StepCounts":
        return StepCounts(self.steps - other.steps, self.full - other.full, self.partial - other.partial)


@dataclass
class Prepared:
    """A method ready to sample: the denoiser for ``sample(transformer=...)`` and its hooks."""

    denoiser: Callable
    config: str
    # entered around every sample() call (reset a cache's state, set its context)
    sample_context: Callable[[], ContextManager] = contextlib.nullcontext
    # per-step callback for sample() (counting skipped steps), or None
    callback: Callable | None = None
    # cumulative step counts since build
    counts: Callable[[], StepCounts] = StepCounts
    # bytes of tensors the method keeps alive between calls (CPU memory accounting)
    held_bytes: Callable[[], int] = lambda: 0
    # extra facts for the row (our runtime's fallback reason, anchors' tuned values)
    info: Callable[[], dict] = dict
    # the same denoiser uncompiled, to fall back to if torch.compile fails on it
    uncompiled: Callable | None = None


@dataclass
class Method:
    name: str  # the row's "method" (several rows may share it: specdiff at two cache ratios)
    label: str  # unique row label, e.g. "specdiff cr=0.5"
    family: str  # "baseline" | "specdiff-fx" | "diffusers" | "cache-dit"
    build: Callable[[Workload], Prepared]


# ----------------------------------------------------------------------------- ours
def baseline_method() -> Method:
    def build(wl: Workload) -> Prepared:
        extra = "" if wl.compiler == "none" else ", fullgraph, dynamic=False"
        return Prepared(wl.compile(wl.model.transformer, fullgraph=True), f"uncached; {wl.compile_note}{extra}")

    return Method("baseline", "baseline", "baseline", build)


def make_groups(num_images: int, batch_size: int, num_classes: int, image_shape: tuple[int, ...],
                seed_offset: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(labels, noise) per sample() call: image i has seed ``seed_offset + i`` (its noise is what
    ``sample(..., seed=seed)`` draws for one image) and label i mod num_classes."""
    groups = []
    for start in range(0, num_images, batch_size):
        idx = list(range(start, min(num_images, start + batch_size)))
        labels = torch.tensor([i % num_classes for i in idx], dtype=torch.long)
        noise = torch.cat([torch.randn((1, *image_shape), generator=torch.Generator().manual_seed(seed_offset + i))
                           for i in idx])
        groups.append((labels, noise))
    return groups


FIT_SEED_OFFSET = 10_500  # seeds the fitted forecaster's rows fit on (never evaluated)


def _fit_on_other_seeds(wl: Workload, compiled) -> None:
    """Fit the ``fitted`` forecaster on one batch of images of seeds never evaluated."""
    from .. import fit_forecaster

    labels, noise = wl.groups[0]
    groups = make_groups(labels.shape[0], labels.shape[0], wl.model.num_classes, tuple(noise.shape[1:]),
                         seed_offset=FIT_SEED_OFFSET)
    fit_forecaster(compiled, lambda: [wl.run_group(compiled, g) for g in groups])


def _backend_method(name: str, label: str, config_text: str, fit: bool = False, regional: bool = False,
                    **backend_kwargs) -> Method:
    """A row of our backend; ``regional``: each block class compiled on its own (a copy of the
    model's transformer, compile_regional), the sampler's steps told to its clock."""
    def build(wl: Workload) -> Prepared:
        from .. import compile_regional, get_runtime, make_backend

        compiler = "inductor" if wl.compiler == "inductor" else "eager"
        if regional:
            compiled = copy.deepcopy(wl.model.transformer)
            handle = compile_regional(compiled, compiler=compiler, fullgraph=True, **backend_kwargs)

            @contextlib.contextmanager
            def context():
                handle.begin_trajectory()
                yield

            def callback(step, t, x):
                handle.end_step()
        else:
            context, callback = contextlib.nullcontext, None
            backend = make_backend(compiler=compiler, **backend_kwargs)
            compiled = torch.compile(wl.model.transformer, backend=backend, fullgraph=True, dynamic=False)
        if fit:
            if regional:
                raise SkipMethod("fitted coefficients are fitted on a whole-model compile")
            _fit_on_other_seeds(wl, compiled)

        def stats() -> dict:
            try:
                return get_runtime(compiled).stats()
            except LookupError:  # not called yet
                return {}

        def counts() -> StepCounts:
            s = stats()
            return StepCounts(s.get("steps", 0), s.get("full_steps", 0), s.get("partial_steps", 0))

        note = f"specdiff backend, compiler={compiler}" + (", regional (blocks compiled on their own)" if regional else "")
        if wl.compiler == "none":
            note += " (our policies always need torch.compile)"
        def info() -> dict:
            s = stats()
            return {k: s[k] for k in ("fallback", "cache_bytes", "kv_cache_bytes", "draft_steps",
                                      "subset_tokens", "image_tokens", "probe_flops_share",
                                      "error_refreshes") if k in s}

        return Prepared(compiled, f"{config_text}; {note}", counts=counts, sample_context=context, callback=callback,
                        held_bytes=lambda: int(stats().get("cache_bytes", 0)), info=info)

    return Method(name, label, "specdiff-fx", build)


def specdiff_method(cache_ratio: float) -> Method:
    return _backend_method("specdiff", f"specdiff cr={cache_ratio:g}", f"cache_ratio={cache_ratio:g}",
                           policy="specdiff", cache_ratio=cache_ratio)


def fora_method(interval: int, warmup_steps: int = 2) -> Method:
    return _backend_method("fora", f"fora interval={interval}", f"interval={interval} warmup={warmup_steps}",
                           policy="fora", interval=interval, warmup_steps=warmup_steps)


def taylor_method(interval: int, order: int = 1, warmup_steps: int = 3, tolerance: float | None = None,
                  lite: bool = False, reset_steps: tuple[int, ...] = (), forecaster: str = "taylor",
                  forecaster_options: dict | None = None, tolerance_growth: float = 0.0) -> Method:
    """Policy taylor; ``interval=0`` with ``reset_steps``: an explicit full-step schedule.
    ``forecaster="fitted"`` fits its coefficients on other seeds when the row is built."""
    name = "taylor-lite" if lite else "taylor"
    when = f"full={','.join(map(str, reset_steps))}" if not interval else f"interval={interval}"
    sigma = (forecaster_options or {}).get("sigma")
    how = "" if forecaster == "taylor" else f" {forecaster}" + (f" s={sigma:g}" if sigma is not None else "")
    label = f"{name} {when}" + (f" order={order}" if order != 1 else "") + how + \
        (f" tol={tolerance:g}" if tolerance is not None else "") + (f" growth={tolerance_growth:g}" if tolerance_growth else "")
    config = f"{when} order={order} warmup={warmup_steps}" + (" lite (one residual per stream)" if lite else "") + \
        (f" tolerance={tolerance:g} (probe: first block)" if tolerance is not None else "") + \
        (f" tolerance_growth={tolerance_growth:g}" if tolerance_growth else "")
    if forecaster != "taylor":
        config += f" forecaster={forecaster}" + (f" sigma={sigma:g}" if sigma is not None else "") + \
            (f" (fitted on seeds {FIT_SEED_OFFSET}+)" if forecaster == "fitted" else "")
    kwargs = dict(policy="taylor", interval=interval, taylor_order=order, warmup_steps=warmup_steps,
                  tolerance=tolerance, lite=lite, reset_steps=tuple(reset_steps))
    if tolerance_growth:
        kwargs["tolerance_growth"] = tolerance_growth
    if forecaster != "fitted":  # fitted: taylor until the fit switches it
        kwargs.update(forecaster=forecaster, forecaster_options=dict(forecaster_options or {}))
    return _backend_method(name, label, config, fit=forecaster == "fitted", **kwargs)


def tuned_method(path: str, regional: bool = False) -> Method:
    """A row from a config ``specdiff-fx tune`` saved (``regional``: its blocks compiled on their own)."""
    import json
    import os

    with open(path) as f:
        saved = json.load(f)
    cfg = dict(saved["config"])
    request = ", ".join(f"{k}={v}" for k, v in saved.get("request", {}).items())
    if cfg.get("full_at"):  # in the sampler's time: progress points
        full = "full_at=" + ",".join(f"{p:g}" for p in cfg["full_at"])
    else:
        full = "full=" + ",".join(map(str, cfg.get("reset_steps", [])))
    label = f"taylor-lite{'-regional' if regional else ''} tuned {request}"
    config = (f"specdiff-fx tune {request} ({os.path.basename(path)}): warmup={cfg.get('warmup_steps')} {full} "
              f"forecaster={cfg.get('forecaster')}" + (" (refined)" if saved.get("refined") else ""))
    name = "taylor-lite-regional-tuned" if regional else "taylor-lite-tuned"
    return _backend_method(name, label, config, regional=regional, **cfg)


def config_method(text: str) -> Method:
    """A row from ``'policy=NAME KEY=VALUE ...'`` (values as Python literals): any registered
    policy, so a new one is benched without an edit here.  The config is checked when the
    row is declared (a typo fails before anything runs)."""
    import ast

    from ..config import SpecDiffConfig

    kwargs = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config: {item!r} is not KEY=VALUE")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a bare word: a string (policy=sandwich)
    if "policy" not in kwargs:
        raise ValueError(f"--config {text!r}: name the policy (policy=NAME)")
    kwargs.pop("compiler", None)  # the run's --compiler decides
    regional = kwargs.pop("regional", False)
    if not isinstance(regional, bool):
        raise ValueError(f"--config {text!r}: regional must be True or False")
    SpecDiffConfig(**kwargs)
    policy = kwargs["policy"]
    rest = " ".join(f"{k}={v}" for k, v in kwargs.items() if k != "policy")
    name = f"{policy}-regional" if regional else policy
    return _backend_method(name, f"{name} {rest}".strip(), rest or "the policy's defaults", regional=regional, **kwargs)


def specdiff_forecast_method(cache_ratio: float, partial_every: int = 1, reset_steps: tuple[int, ...] = (),
                             kv_forecast: bool = False) -> Method:
    """Token-level SpecDiff whose uncomputed tokens follow their own forecast (c3="forecast"),
    optionally their keys/values too (``kv_forecast``); ``reset_steps``: explicit full steps
    after the warm-up (0-2) instead of the policy's default schedule."""
    when = f" full={','.join(map(str, reset_steps))}" if reset_steps else ""
    label = (f"specdiff-forecast cr={cache_ratio:g}" + (f" every={partial_every}" if partial_every != 1 else "")
             + when + (" kv" if kv_forecast else ""))
    config = (f"cache_ratio={cache_ratio:g} c3=forecast c2_share=0 partial_every={partial_every}"
              + (" kv_forecast (horizon 1)" if kv_forecast else ""))
    kwargs = dict(policy="specdiff", cache_ratio=cache_ratio, c3="forecast", c2_share=0.0, partial_every=partial_every,
                  kv_forecast=kv_forecast)
    if reset_steps:
        config += f" full={','.join(map(str, reset_steps))} warmup=3"
        kwargs.update(interval=0, warmup_steps=3, reset_steps=tuple(reset_steps))
    return _backend_method("specdiff-forecast", label, config, **kwargs)


