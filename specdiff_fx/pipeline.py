"""``compile_pipeline``: a diffusers pipeline's denoisers compiled with specdiff, on the pipeline's clock.

Why an entry point for pipelines: a model compiled on its own has only its inputs to tell
trajectories, steps and call slots apart (runtime/step_tracker.py), and some patterns cannot
be told from inputs at all (a short refine call right after a full one).  The pipeline knows:
every diffusers pipeline calls ``scheduler.set_timesteps`` before its loop and
``scheduler.step`` after each model evaluation it consumes.  So ``compile_pipeline``

* compiles every denoiser the pipeline holds (``transformer``, ``transformer_2``, ``unet``, …)
  in place (``nn.Module.compile``), each with a backend and runtimes of its own;
* wraps *this pipeline's scheduler instance* (instance attributes ``set_timesteps`` and
  ``step``, ``functools.wraps`` so pipelines that inspect ``step``'s signature still see it) to
  report those two events to one :class:`~specdiff_fx.runtime.PipelineClock` that every
  runtime of every denoiser reads;
* lends the scheduler to specdiff's self-speculative draft: a copy set to a few steps, so the
  draft advances as the pipeline samples.

No diffusers class is patched; ``restore_pipeline`` removes the instance attributes and the
compiled call of each denoiser.  docs/pipelines.md has the whole picture.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .backend import SpecDiffBackend, backend_of, compile_in_place, make_backend
from .config import SpecDiffConfig
from .regional import compile_blocks, regional_config
from .runtime import Draft, PipelineClock

log = logging.getLogger("specdiff_fx")

DENOISER_PACKAGES = ("diffusers.models.transformers", "diffusers.models.unets")
"""Where diffusers keeps its denoiser classes (not VAEs, text encoders or ControlNets)."""

_WRAPPED = ("set_timesteps", "step")


@dataclass
class PipelineCaching:
    """What compile_pipeline did to one pipeline (``pipe._specdiff``), so it can be undone."""

    clock: PipelineClock
    backends: dict[str, SpecDiffBackend]
    scheduler: Any = None
    set_timesteps_call: tuple | None = None   # the pipeline's latest (args, kwargs)
    wrapped: list[str] = field(default_factory=list)
    compiled: list[torch.nn.Module] = field(default_factory=list)  # modules compile_pipeline compiled
    attached: list[SpecDiffBackend] = field(default_factory=list)  # backends of blocks the user compiled


def denoiser_names(pipe: Any) -> list[str]:
    """The pipeline components that are diffusers transformers or UNets."""
    names = []
    for name, component in getattr(pipe, "components", {}).items():
        if isinstance(component, torch.nn.Module) and type(component).__module__.startswith(DENOISER_PACKAGES):
            names.append(name)
    return names


def compile_pipeline(pipe: Any, config: SpecDiffConfig | None = None, *, denoisers: Sequence[str] | None = None,
                     fullgraph: bool = False, dynamic: bool | None = True, regional: bool = False,
                     **overrides: Any) -> Any:
    """Compile ``pipe``'s denoisers with specdiff and drive their caches from the pipeline's
    own clock.  ``config`` / ``overrides``: as for :func:`~specdiff_fx.make_backend`.
    ``denoisers``: component names (default: every diffusers transformer or UNet it holds).
    ``fullgraph`` stays False by default: some models break the graph in their own code
    (Lumina2, HiDream), and their frames still cache (docs/design.md, graph breaks).
    ``dynamic=True`` (the default) serves many shapes: each denoiser compiles to two graphs
    that serve every image size, prompt length, frame count and batch size (batch 1, dynamo's
    0/1 specialization, and larger batches; a code path of the model's own, like Qwen-Image's
    text mask, one more), every policy caching (docs/design.md, "Shape-general variants";
    docs/pipelines.md, "Serving many shapes").  ``dynamic=False`` compiles a static graph per
    shape: a cached step a fraction of a millisecond faster where a process serves one shape,
    and it stops compiling after dynamo's ``recompile_limit`` shapes (said by a warning).
    ``regional``: compile each repeated block class once (diffusers' ``_repeated_blocks``, or
    the blocks of the model's stacks) instead of the whole model -- a cold start a fraction as
    long; fora and taylor cache per block, on the pipeline's clock (docs/pipelines.md,
    "Regional compilation").  Blocks the user compiled already with a specdiff backend
    (``transformer.compile_repeated_blocks(backend=make_backend(...))``) are put on the
    pipeline's clock as they are.
    Returns ``pipe``; :func:`restore_pipeline` undoes everything."""
    if getattr(pipe, "_specdiff", None) is not None:
        raise ValueError("this pipeline is compiled with specdiff already; call restore_pipeline(pipe) first")
    names = list(denoisers) if denoisers is not None else denoiser_names(pipe)
    modules, seen = {}, set()
    for name in names:  # one module under two names is compiled once
        module = getattr(pipe, name, None)
        if module is not None and id(module) not in seen:
            modules[name] = module
            seen.add(id(module))
    if not modules:
        raise ValueError(f"no denoiser found in {type(pipe).__name__} (looked for diffusers transformers and "
                         "UNets among its components); name them with denoisers=[...]")
    user_compiled = {}
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"pipe.{name} is a {type(module).__name__}, not a torch module")
        if _is_compiled(module):
            raise ValueError(f"pipe.{name} is compiled already; pass the pipeline with its plain modules")
        blocks = [m for m in module.modules() if _is_compiled(m)]
        if blocks:
            if regional:
                raise ValueError(f"pipe.{name} has compiled blocks already; pass regional=True only for plain modules")
            user_compiled[name] = _specdiff_backends(name, blocks)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not all(callable(getattr(scheduler, n, None)) for n in _WRAPPED):
        raise ValueError(f"{type(pipe).__name__} has no scheduler with set_timesteps() and step(): "
                         "compile its denoiser with torch.compile(model, backend=...) instead")
    clock = PipelineClock()
    caching = PipelineCaching(clock=clock, backends={})
    if regional:
        config = regional_config(config, overrides)
        overrides = {}
    for name, module in modules.items():
        if name in user_compiled:  # the user's own regional compile: only the clock is ours
            for backend in user_compiled[name]:
                backend.pipeline_clock = clock
                backend.regional = True  # it compiled the model's blocks, each on its own
                caching.attached.append(backend)
            caching.backends[name] = user_compiled[name][0]
            continue
        backend = make_backend(config, **overrides)
        backend.pipeline_clock = clock
        if regional:
            targets = compile_blocks(module, backend, fullgraph=fullgraph, dynamic=dynamic)
        else:
            compile_in_place(module, backend, fullgraph=fullgraph, dynamic=dynamic)
            targets = [module]
        caching.compiled.extend(targets)
        caching.backends[name] = backend
    _wrap_scheduler(scheduler, caching)
    clock.draft_source = functools.partial(_scheduler_draft, caching)
    clock.timestep_source = functools.partial(_scheduler_timestep, caching)
    clock.before_call = functools.partial(_follow_scheduler_swap, weakref.ref(pipe), caching)
    pipe._specdiff = caching
    log.info("specdiff: compiled %s of %s on the pipeline's clock (%s%s)", ", ".join(modules), type(pipe).__name__,
             type(scheduler).__name__, ", regional" if regional else "")
    return pipe


def _is_compiled(module: torch.nn.Module) -> bool:
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule) or \
        getattr(module, "_compiled_call_impl", None) is not None


def _specdiff_backends(name: str, blocks: Sequence[torch.nn.Module]) -> list[SpecDiffBackend]:
    """The specdiff backends of blocks the user compiled (an error for any other backend)."""
    found: list[SpecDiffBackend] = []
    for block in blocks:
        try:
            backend = backend_of(block)
        except TypeError as exc:
            raise ValueError(f"pipe.{name} has a block compiled with another backend ({exc}); pass the "
                             "pipeline with its plain modules, or blocks compiled with a specdiff backend") from exc
        if all(backend is not b for b in found):
            found.append(backend)
    return found


def restore_pipeline(pipe: Any) -> Any:
    """Undo :func:`compile_pipeline`: plain denoisers, the scheduler as it was."""
    caching = getattr(pipe, "_specdiff", None)
    if caching is None:
        raise ValueError("this pipeline was not compiled with specdiff_fx.compile_pipeline")
    for module in caching.compiled:
        module._compiled_call_impl = None
    for backend in caching.attached:  # blocks the user compiled stay compiled, off our clock
        backend.pipeline_clock = None
    for attr in caching.wrapped:
        caching.scheduler.__dict__.pop(attr, None)
    caching.clock.stop()
    del pipe._specdiff
    return pipe


def _follow_scheduler_swap(pipe_ref: weakref.ref, caching: PipelineCaching) -> None:
    """``pipe.scheduler = OtherScheduler.from_config(...)`` after compile_pipeline: the new one set
    its timesteps unseen, so this call begins a trajectory; from here on the new one reports."""
    pipe = pipe_ref()
    scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
    if scheduler is None or scheduler is caching.scheduler:
        return
    for attr in caching.wrapped:
        caching.scheduler.__dict__.pop(attr, None)
    _wrap_scheduler(scheduler, caching)
    caching.set_timesteps_call = None  # its settings were not seen: the draft uses its default update
    caching.clock.begin_trajectory()
    log.info("specdiff: the pipeline's scheduler was replaced (%s); following the new one",
             type(scheduler).__name__)


def _wrap_scheduler(scheduler: Any, caching: PipelineCaching) -> None:
    """Report this scheduler instance's ``set_timesteps`` and ``step`` to the clock."""
    clock = caching.clock
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    @functools.wraps(set_timesteps)
    def set_timesteps_and_begin(*args: Any, **kwargs: Any) -> Any:
        out = set_timesteps(*args, **kwargs)
        caching.set_timesteps_call = (args, kwargs)
        clock.begin_trajectory()
        return out

    @functools.wraps(step)
    def step_and_count(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        clock.end_step()
        return out

    scheduler.__dict__["set_timesteps"] = set_timesteps_and_begin
    scheduler.__dict__["step"] = step_and_count
    caching.scheduler, caching.wrapped = scheduler, list(_WRAPPED)


def _scheduler_timestep(caching: PipelineCaching) -> float | None:
    """The scheduler's timestep at the clock's current step (its list from the begin index on:
    img2img starts mid-list), for block frames, which receive none."""
    scheduler = caching.scheduler
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    i = (getattr(scheduler, "begin_index", None) or 0) + caching.clock.step
    return float(timesteps[i]) if 0 <= i < len(timesteps) else None


def _subsample(values: Any, steps: int) -> Any:
    """``steps`` evenly spaced entries of a sigma/timestep list, the first one first."""
    n = len(values)
    picked = [values[min(n - 1, round(j * n / steps))] for j in range(steps)]
    if isinstance(values, torch.Tensor):
        return torch.stack(list(picked))
    try:
        import numpy as np

        if isinstance(values, np.ndarray):
            return np.array(picked, dtype=values.dtype)
    except ImportError:  # pragma: no cover - numpy comes with torch
        pass
    return [float(v) for v in picked]


def _scheduler_draft(caching: PipelineCaching, steps: int) -> Draft | None:
    """A ``steps``-step draft of the pipeline's own sampler, starting where its trajectory starts:
    a copy of its scheduler re-set to ``steps`` steps where that copy starts at the trajectory's
    first timestep; else a DDIM step on the scheduler's own noise schedule (``alphas_cumprod``)
    and parameterization (epsilon, v or sample); else None (the runtime's default update)."""
    real = caching.scheduler
    if real is None:
        return None
    try:
        begin = getattr(real, "begin_index", None) or 0
        first = float(real.timesteps[begin])
    except Exception:  # no timesteps set: nothing to draft along
        return None
    return _copied_draft(caching, steps, first) or _alphas_draft(real, steps, first)


def _copied_draft(caching: PipelineCaching, steps: int, first: float) -> Draft | None:
    """The pipeline's scheduler, copied and set as the pipeline set it but with ``steps`` steps (a
    custom sigma or timestep list is subsampled).  None when the copy cannot be set so, or starts
    elsewhere than the trajectory (``leading`` spacing, img2img), or yields a non-finite timestep."""
    if caching.set_timesteps_call is None:
        return None
    args, kwargs = caching.set_timesteps_call
    real = caching.scheduler
    try:
        draft = copy.deepcopy(real)
        for attr in caching.wrapped:
            draft.__dict__.pop(attr, None)
        if getattr(draft.config, "skip_prk_steps", True) is False:
            draft.register_to_config(skip_prk_steps=True)  # PNDM's Runge-Kutta warm-up needs 4+ steps
        args, kwargs = list(args), dict(kwargs)
        for key in ("sigmas", "timesteps"):
            if kwargs.get(key) is not None:
                kwargs[key] = _subsample(kwargs[key], steps)
                if "num_inference_steps" in kwargs and kwargs["num_inference_steps"] is not None:
                    kwargs["num_inference_steps"] = steps
                break
        else:
            if "num_inference_steps" in kwargs or not args:
                kwargs["num_inference_steps"] = steps
            else:
                args[0] = steps
        draft.set_timesteps(*args, **kwargs)
        timesteps = [float(t) for t in draft.timesteps[:steps]]
    except Exception as exc:  # a scheduler we cannot copy or re-set
        log.info("specdiff: no draft copy of %s (%s: %s)", type(real).__name__, type(exc).__name__, exc)
        return None
    if len(timesteps) < 2 or not all(math.isfinite(t) for t in timesteps) \
            or abs(timesteps[0] - first) > 1e-3 * abs(first) + 1e-6:
        return None
    # a stochastic sampler (DDPM) draws its noise from a generator of the draft's own: the
    # draft is deterministic and never touches the global random state the user seeded
    takes_generator = "generator" in inspect.signature(draft.step).parameters
    scale_input = getattr(draft, "scale_model_input", None)
    state: dict = {}

    def advance(x: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor:
        """``x`` is the model's input: a sampler that scales it (Euler-type: x / sqrt(sigma^2 + 1))
        steps the unscaled sample, so the draft keeps that and scales what it hands back."""
        extra = {}
        if takes_generator:
            if i == 0:
                state["generator"] = torch.Generator(device=x.device).manual_seed(0)
            extra["generator"] = state["generator"]
        if i == 0:
            unit = torch.ones((), dtype=x.dtype, device=x.device)
            sample = x / scale_input(unit, timesteps[0]) if scale_input is not None else x
        else:
            sample = state["sample"]
        prev = draft.step(model_output, draft.timesteps[i], sample, return_dict=False, **extra)[0]
        state["sample"] = prev
        return scale_input(prev, draft.timesteps[i + 1]) if scale_input is not None else prev

    return Draft(timesteps=timesteps, advance=advance)


def _alphas_draft(real: Any, steps: int, first: float) -> Draft | None:
    """DDIM (deterministic) on the pipeline's noise schedule and parameterization, over ``steps``
    evenly spaced timesteps from ``first``.  It works on the model's input as it is: for every
    scheduler with ``alphas_cumprod`` that input is the sample in DDPM form (Euler-type schedulers
    divide by sqrt(sigma^2 + 1) to make it so)."""
    alphas = getattr(real, "alphas_cumprod", None)
    prediction = getattr(getattr(real, "config", None), "prediction_type", "epsilon")
    if not isinstance(alphas, torch.Tensor) or prediction not in ("epsilon", "v_prediction", "sample") \
            or not first > 0:
        return None
    timesteps = [first * (1.0 - j / steps) for j in range(steps)]

    def alpha(t: float) -> float:
        return float(alphas[min(len(alphas) - 1, max(0, round(t)))])

    def advance(x: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor:
        a = alpha(timesteps[i])
        a_next = alpha(timesteps[i + 1]) if i + 1 < len(timesteps) else 1.0
        pred = model_output.to(x.dtype)
        if prediction == "epsilon":
            eps = pred
            x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        elif prediction == "v_prediction":
            x0 = a ** 0.5 * x - (1 - a) ** 0.5 * pred
            eps = a ** 0.5 * pred + (1 - a) ** 0.5 * x
        else:
            x0 = pred
            eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
        return a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps

    return Draft(timesteps=timesteps, advance=advance)
