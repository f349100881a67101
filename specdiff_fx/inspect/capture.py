"""Get the graph the backend would see, for a built-in tiny model or a user factory."""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.fx as fx

from ..testing.tiny_models import TINY_FAMILIES, build_tiny


class GraphBreaks(RuntimeError):
    """Dynamo cannot trace the model as one graph (diffusers code breaks it)."""


def capture_graph(model: torch.nn.Module, example_kwargs: dict[str, Any]) -> tuple[fx.GraphModule, list]:
    """The torch-level FX graph (and example inputs) dynamo hands a backend for ``model(**kwargs)``.

    Uses a backend that only records, with the settings we recommend
    (``fullgraph=True, dynamic=False``), so the graph is the one specdiff would rewrite.
    Raises :class:`GraphBreaks` where the model's code breaks the graph.
    """
    graphs: list[tuple[fx.GraphModule, list]] = []

    def record(gm: fx.GraphModule, example_inputs: list) -> Any:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    compiled = torch.compile(model, backend=record, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            compiled(**example_kwargs)
    except torch._dynamo.exc.TorchDynamoException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first if len(first) <= 160 else first[:157] + "..."
        raise GraphBreaks(f"dynamo cannot trace one graph ({first})") from exc
    if len(graphs) != 1:
        raise RuntimeError(
            f"expected dynamo to hand over one graph, got {len(graphs)} "
            "(a cached compile of this model? call torch._dynamo.reset() first)")
    return graphs[0]


def load_model(spec: str) -> tuple[str, torch.nn.Module, dict[str, Any]]:
    """``"dit"`` (a built-in tiny family) or ``"package.module:factory"`` -> (title, model, kwargs).

    A factory is called without arguments and returns ``(model, example_kwargs)``.
    """
    if spec in TINY_FAMILIES:
        case = build_tiny(spec)
        return f"tiny {spec} ({type(case.model).__name__})", case.model, case.make_inputs()
    module_name, sep, factory_name = spec.partition(":")
    if not sep or not module_name or not factory_name:
        raise ValueError(f"model must be one of {sorted(TINY_FAMILIES)} or 'module:factory', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), factory_name)
    model, kwargs = factory()
    return f"{spec} ({type(model).__name__})", model, kwargs
