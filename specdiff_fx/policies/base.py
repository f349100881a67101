"""What a caching policy is: its config section, how it builds the runtime of one graph, and
what the inspection report reads of it.

Why a class per policy: a policy used to be spread over the config's one flat field list, an
``if`` chain in the backend, hand tables in the inspection report and the bench, so each new
method was about ten edits.  A policy is now one module (``policies/<name>.py``) holding a
subclass of :class:`Policy`; :mod:`specdiff_fx.config` builds ``SpecDiffConfig`` from the
registered sections, the backend calls :meth:`Policy.build`, ``inspect`` reads
:attr:`Policy.runs_at`.  docs/design.md, "Adding a policy", walks through one.

Contracts a policy keeps:

* its :attr:`Policy.fields` are validated by the config, field by field and then by
  :meth:`Policy.resolve` (cross-field rules), before dynamo runs; ``build`` trusts them;
* :meth:`Policy.build` rewrites copies (passes never mutate ``ctx.gm``), verifies every variant
  it compiles on fake tensors (:func:`verify_variants`) and returns a runtime whose variant
  names are keys of :attr:`Policy.runs_at`;
* what it cannot handle raises :class:`UnsupportedGraph` with a reason a user can act on:
  the backend then compiles the plain graph and warns once, naming it.

The checks a :class:`Field` uses are in ``policies/checks.py``, FLOP counts in
``policies/flops.py``.

Imports: torch, passes/, runtime/, buffers.  Never the backend, config, inspect or bench.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.fx as fx

from ..buffers import BufferRole, BufferSpec
from ..passes.graph_inputs import GraphInputs
from ..passes.residual_branches import ResidualBranch
from ..passes.verify import VariantVerificationError, output_signature, verify_variant, with_fake_values
from ..runtime import CachingRuntime
from .checks import one_of

log = logging.getLogger("specdiff_fx")


class UnsupportedGraph(Exception):
    """A graph a policy cannot handle; the backend falls back to a plain compile."""


# ----------------------------------------------------------------------------- config fields
@dataclass(frozen=True)
class Field:
    """One config field: its default, its own check, and what it means.

    ``check(value)`` returns the value to store (normalised, e.g. a list made a tuple) or raises
    ``ValueError``/``TypeError``; a message that does not start with ``SpecDiffConfig`` is
    prefixed with ``SpecDiffConfig.<name> ``.  Rules between fields belong in
    :meth:`Policy.resolve`.
    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    doc: str
    type: str = "Any"


# ----------------------------------------------------------------------------- building
@dataclass
class BuildContext:
    """What the backend hands a policy for one dynamo graph.

    ``common`` holds the :class:`CachingRuntime` keyword arguments every policy passes on (the
    step clock, the graph's input positions, ...); ``compile(graph, examples)`` compiles a
    variant with the configured compiler; ``follow`` is set for a frame without a timestep
    that follows the model's steps (policies with ``follows_graph_breaks``).
    """

    gm: fx.GraphModule
    example_inputs: Sequence[Any]
    inputs: GraphInputs
    config: Any
    common: dict
    compile: Callable[[fx.GraphModule, Sequence[Any]], Callable]
    branches: list[ResidualBranch] = field(default_factory=list)
    forecast_calibration: Any = None
    block_frame: bool = False
    """The graph is a block compiled on its own (regional compilation): no timestep, steps from
    the pipeline's clock, one runtime per block instance."""


class Policy:
    """A caching policy.  Subclass it in a module of its own and register it
    (:func:`specdiff_fx.policies.register`)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    """One line: what cached steps do (the CLI and docs show it)."""
    order: ClassVar[int] = 100
    """Where the policy is listed (CLI choices, docs); the built-in ones are 0-3."""
    fields: ClassVar[tuple[Field, ...]] = ()
    """The policy's config section (fields another policy also declares must be declared alike)."""
    schedule: ClassVar[tuple[int, int, tuple[int, ...]]] = (1, 1, ())
    """Defaults of the shared schedule fields: warm-up steps, interval, reset steps."""
    runs_at: ClassVar[dict[str, str]] = {}
    """Variant name -> when the runtime runs it (the inspection report's column)."""
    needs_branches: ClassVar[bool] = True
    """The graph must have residual branches (else the plain graph, with a warning)."""
    follows_graph_breaks: ClassVar[bool] = False
    """The policy caches a frame that holds part of the stack and no timestep input: blocks
    after a graph break (they follow the steps of the model's frame that has one) and blocks
    compiled on their own (regional compilation, steps from the pipeline's clock).  Policies
    whose steps need the timestep or the whole stack leave it off."""

    shape_general: ClassVar[bool] = True
    """The policy builds its variants on a dynamic graph, buffers sized symbolically (one build
    serves every size).  Off: the backend specializes a dynamic graph at each call's sizes and
    builds on that static copy (passes/specialize.py), a build per new size."""

    def resolve(self, values: dict[str, Any]) -> None:
        """Cross-field rules and defaults that depend on other fields, on the config's values
        (a dict, changed in place) when this is the config's policy.  Raise ValueError or
        TypeError naming the fields."""

    def on_replace(self, current: Any, changes: dict[str, Any]) -> None:
        """``SpecDiffConfig.replace``: adjust ``changes`` (in place) before they apply, e.g. set a
        derived field back to None so :meth:`resolve` derives it again."""

    def build(self, ctx: BuildContext) -> CachingRuntime:
        """The runtime of graph ``ctx.gm``: its variants built, verified and compiled."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<policy {self.name!r}>"


def trace_artifacts(graphs: dict[str, fx.GraphModule], analysis: dict) -> None:
    """Emit the variant graphs (named as the runtime names them) and the analysis as
    structured-trace artifacts, so ``TORCH_TRACE`` + tlparse show them beside dynamo's."""
    import json

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


def cache_dtype(name: str | None) -> torch.dtype | None:
    """A config's ``cache_dtype`` as a torch dtype (None: the model's own)."""
    return None if name is None else getattr(torch, name)


def verify_variants(graphs: dict[str, tuple[fx.GraphModule, Sequence[Any]]], original: fx.GraphModule) -> None:
    """Run every variant once on fake tensors before it is compiled (passes/verify.py): its
    outputs must match the original graph's (shapes, dtypes).  Node metadata is refreshed from
    the run; a failure becomes :class:`UnsupportedGraph` naming the node, never an error at step N."""
    expected = output_signature(original)
    for name, (graph, examples) in graphs.items():
        try:
            with_fake_values(graph, verify_variant(graph, examples, expected))
        except VariantVerificationError as exc:
            raise UnsupportedGraph(f"the {name} variant failed build-time verification at {exc}") from exc
        log.debug("specdiff: %s variant verified on fake tensors (%d nodes)", name, len(graph.graph.nodes))


def example_buffer(spec: BufferSpec, fake_mode: Any = None) -> torch.Tensor:
    """An example value of a variant's buffer input to compile with: zeros, or valid distinct
    token positions for an index buffer; in a dynamic graph's fake mode (``fake_mode``) a fake
    tensor, of its symbolic shape where it has one."""
    if spec.symbolic and fake_mode is None:
        raise UnsupportedGraph(f"buffer {spec.name!r} has a symbolic shape and the graph's inputs no fake mode")
    if fake_mode is not None:  # a dynamic graph's: every buffer a fake of the graph's own mode
        with fake_mode:
            return _example(spec, spec.example_shape if spec.symbolic else spec.shape)
    return _example(spec, spec.shape)


def _example(spec: BufferSpec, shape: tuple) -> torch.Tensor:
    if spec.role == BufferRole.INDEX:
        return torch.arange(shape[1], device=spec.device).expand(shape).contiguous()
    return torch.zeros(shape, dtype=spec.dtype, device=spec.device)


def with_buffers(example_inputs: Sequence[Any], specs: Sequence[BufferSpec]) -> list[Any]:
    """The graph's example inputs followed by an example of each buffer (a dynamic graph's
    example inputs are its placeholders' fake values, backend.py)."""
    from torch._subclasses.fake_tensor import FakeTensor

    fake_mode = next((x.fake_mode for x in example_inputs if isinstance(x, FakeTensor)), None)
    return list(example_inputs) + [example_buffer(s, fake_mode) for s in specs]


CACHE_DTYPES = ("bfloat16", "float16", "float32")

CACHE_DTYPE = Field(
    "cache_dtype", None, one_of(None, *CACHE_DTYPES),
    "hold branch caches and Taylor terms in ``\"bfloat16\"`` or ``\"float16\"`` (None: the model's "
    "dtype); reads cast back, so only the stored values are rounded.  Halves cache memory for an fp32 model.",
    "str | None")
"""Shared by the branch-level policies (fora, taylor)."""
