"""Graph-diff inspection: see exactly what the rewrite did to a model's graph, and what it costs.

Sits on top of the compiler (imports the backend, ``passes`` and ``runtime``); nothing
below imports it.  Entry points: :func:`diff` for two graphs; :func:`inspect_model` (a model and example
inputs), :func:`inspect_graph` (a captured graph), :func:`inspect_compiled` (a model
compiled with a specdiff backend) for a full report; ``specdiff-fx inspect`` on the
command line.
"""

from .capture import capture_graph, load_model
from .graph_diff import GraphDiff, NodeChange, diff
from .report import (
    AttentionSite,
    BranchInfo,
    InspectionReport,
    VariantInfo,
    build_report,
    inspect_compiled,
    inspect_graph,
    inspect_model,
    inspect_runtime,
)
from .text import render_text

__all__ = [
    "AttentionSite", "BranchInfo", "GraphDiff", "InspectionReport", "NodeChange", "VariantInfo",
    "build_report", "capture_graph", "diff", "inspect_compiled", "inspect_graph", "inspect_model",
    "inspect_runtime", "load_model", "render_text",
]
