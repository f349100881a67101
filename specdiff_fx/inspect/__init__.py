"""Graph-diff inspection: see exactly what the rewrite did to a model's graph, and what it costs.

Sits on top of the compiler (imports ``passes``, ``runtime``, ``config``); nothing below
imports it.  Entry points: :func:`diff` for two graphs, :func:`inspect_graph` /
:func:`inspect_model` for a full report, ``specdiff-fx inspect`` on the command line.
"""

from .capture import capture_graph, load_model
from .graph_diff import GraphDiff, NodeChange, diff
from .report import AttentionSite, BranchInfo, InspectionReport, VariantInfo, inspect_graph, inspect_model
from .text import render_text

__all__ = [
    "AttentionSite", "BranchInfo", "GraphDiff", "InspectionReport", "NodeChange", "VariantInfo",
    "capture_graph", "diff", "inspect_graph", "inspect_model", "load_model", "render_text",
]
