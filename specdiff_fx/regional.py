"""Regional compilation: each repeated block class compiled once, its caches on a clock that is told the steps.

Why: a whole-model compile is the cold start a served model pays at every restart, scale-out
and redeploy; diffusers documents regional compilation (``compile_repeated_blocks``) for it:
one dynamo frame per block class, shared by every instance.  A block's graph has no timestep
input (the conditioning arrives as ``temb``), so its runtime cannot infer the denoising clock;
it takes it from a :class:`~specdiff_fx.runtime.PipelineClock` instead -- the pipeline's own
scheduler calls through :func:`specdiff_fx.compile_pipeline` (``regional=True``), or the
caller's ``begin_trajectory()`` / ``end_step()`` in a loop of its own (:func:`compile_regional`).

Every block instance gets a runtime of its own (its parameters say which block called), so
fora reuses each block's branches and lite taylor forecasts each block's residual.  For a
forecast linear in the recorded terms, the blocks' forecasts add up to the whole stack's: lite
taylor regional gives the whole-model lite output to float rounding (tests/test_regional.py).
Token-level specdiff needs the whole model's graph (its draft and token choice span every
block): regional compiles it without caching, with one warning.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from .backend import SpecDiffBackend, compile_in_place, make_backend
from .config import SpecDiffConfig
from .policies import POLICIES
from .runtime import PipelineClock

log = logging.getLogger("specdiff_fx")


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks regional compilation compiles: instances of the classes diffusers names in
    ``model._repeated_blocks``; without that list (SD3, PixArt, the reference model), the items of
    each ``ModuleList`` whose modules share one class (a stack of blocks), outermost first."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    if names:
        blocks = [m for m in model.modules() if type(m).__name__ in names]
    else:
        blocks = []

        def walk(module: torch.nn.Module) -> None:
            for child in module.children():
                if isinstance(child, torch.nn.ModuleList) and len(child) >= 2 and \
                        len({type(m) for m in child}) == 1 and not type(child[0]).__module__.startswith("torch."):
                    blocks.extend(child)
                else:
                    walk(child)

        walk(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to compile on their own (no "
                         "_repeated_blocks and no ModuleList of one block class); compile it whole (regional=False)")
    return blocks


def regional_config(config: SpecDiffConfig | None, overrides: dict) -> SpecDiffConfig:
    """The config for block frames: a policy that cannot cache part of the stack (token-level
    specdiff, sandwich) is switched off with one warning, naming it."""
    config = config if config is not None else SpecDiffConfig()
    config = config.replace(**overrides) if overrides else config
    policy = POLICIES[config.policy]
    if policy.needs_branches and not policy.follows_graph_breaks:
        warnings.warn(
            f"specdiff: regional compilation compiles each block on its own, and policy {policy.name!r} needs the "
            "whole model's graph: the blocks are compiled without caching (policy 'off'); use policy 'fora' or "
            "'taylor' with regional=True, or compile the whole model", RuntimeWarning, stacklevel=3)
        config = config.replace(policy="off")
    return config


def compile_blocks(model: torch.nn.Module, backend: SpecDiffBackend, *, fullgraph: bool = False,
                   dynamic: bool = False) -> list[torch.nn.Module]:
    """Compile each of ``model``'s repeated blocks in place with ``backend`` (one dynamo frame
    per block class); returns the blocks."""
    blocks = repeated_blocks(model)
    backend.regional = True
    for block in blocks:
        compile_in_place(block, backend, fullgraph=fullgraph, dynamic=dynamic)
    log.info("specdiff: %d blocks of %s compiled on their own (%s)", len(blocks), type(model).__name__,
             ", ".join(sorted({type(b).__name__ for b in blocks})))
    return blocks


class RegionalCompile:
    """What :func:`compile_regional` returns: the clock a loop of one's own tells the steps
    (:meth:`begin_trajectory` before a trajectory, :meth:`end_step` after each step, as a
    scheduler's ``set_timesteps`` and ``step`` would), the backend, and :meth:`restore`."""

    def __init__(self, model: torch.nn.Module, backend: SpecDiffBackend, blocks: list[torch.nn.Module],
                 clock: PipelineClock) -> None:
        self.model, self.backend, self.blocks, self.clock = model, backend, blocks, clock

    def begin_trajectory(self) -> None:
        self.clock.begin_trajectory()

    def end_step(self) -> None:
        self.clock.end_step()

    def restore(self) -> None:
        """The blocks as they were (plain modules, not compiled)."""
        for block in self.blocks:
            block._compiled_call_impl = None


def compile_regional(model: torch.nn.Module, config: SpecDiffConfig | None = None, *, fullgraph: bool = False,
                     dynamic: bool = False, **overrides: Any) -> RegionalCompile:
    """Regional compilation of ``model`` for a loop of one's own: its repeated blocks compiled with
    a specdiff backend whose steps the loop reports (:class:`RegionalCompile`).  Through a
    diffusers pipeline use ``compile_pipeline(pipe, regional=True)``: the scheduler reports them."""
    config = regional_config(config, overrides)
    backend = make_backend(config)
    clock = PipelineClock()
    backend.pipeline_clock = clock
    blocks = compile_blocks(model, backend, fullgraph=fullgraph, dynamic=dynamic)
    return RegionalCompile(model, backend, blocks, clock)
