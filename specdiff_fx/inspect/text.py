"""Plain-text rendering of an :class:`InspectionReport` (tabulate tables)."""

from __future__ import annotations

import re

import sympy
from tabulate import tabulate

from .cost import format_count
from .report import InspectionReport

_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def formula(expr: sympy.Expr) -> str:
    """``2*B*N**2*d`` -> ``2·B·N²·d``: formulas read like the paper's."""
    text = re.sub(r"\*\*(\d+)", lambda m: m.group(1).translate(_SUPERSCRIPT), str(expr))
    return text.replace("*", "·")


def _factor(expr: sympy.Expr) -> str:
    return f"({formula(expr)})" if isinstance(expr, sympy.Add) else formula(expr)


def summary_line(report: InspectionReport) -> str:
    layers = {str(s): v for s, v in report.original_flops.values.items() if str(s).startswith("L")}
    sizes = " ".join([report.sizes.describe()] + [f"{k}={v}" for k, v in layers.items()])
    return (f"policy: {report.policy} · graph: {len(report.original.graph.nodes)} nodes · "
            f"sizes: {sizes or 'unknown'}")


def branch_rows(report: InspectionReport, block: str | None = None) -> tuple[list[str], list[list]]:
    """One row per branch; within a ``block`` the names are relative to it."""
    names = [v.name for v in report.variants]
    rows = []
    for info in report.branches:
        br = info.branch
        if block is not None and br.block != block:
            continue
        name = br.name if block is None else br.name[len(block):].lstrip(".:")
        rows.append([name, br.kind, br.stream, br.gate or "-", info.token_wise,
                     ", ".join(br.attention_nodes) or "-", formula(info.flops),
                     ", ".join(info.levels) or "-", *(info.status[n] for n in names)])
    return ["branch", "kind", "stream", "gate", "token-wise", "attention", "body FLOPs",
            "caching level", *names], rows


def attention_rows(report: InspectionReport, block: str | None = None) -> tuple[list[str], list[list]]:
    names = [v.name for v in report.variants]
    rows = [[a.node, a.module, a.kind, f"{_factor(a.queries)} × {_factor(a.keys)}", a.heads,
             ", ".join(a.branches) or "-", *(a.status[n] for n in names)]
            for a in report.attention if block is None or a.block == block]
    return ["node", "module", "kind", "queries × keys", "heads", "branch", *names], rows


def variant_rows(report: InspectionReport) -> tuple[list[str], list[list]]:
    rows = []
    for v in report.variants:
        counts = v.diff.counts()
        kinds = ", ".join(f"{k}×{n}" for k, n in v.diff.kinds().items()) or "-"
        rows.append([v.name, v.runs_at, f"+{counts['added']}", f"−{counts['removed']}", f"~{counts['changed']}",
                     kinds, format_count(v.flops.value), f"{report.flop_ratio(v):.3g}",
                     format_count(v.cache.value, "B")])
    return ["variant", "runs at", "added", "removed", "changed", "kinds (meta['specdiff'])", "FLOPs",
            "× original", "cache memory"], rows


def collective_rows(report: InspectionReport) -> tuple[list[str], list[list]]:
    """Collectives each variant issues per call (context parallelism), with bytes by formula.

    ``bytes``: message sizes (nccl-tests convention); ``bus bytes``: what each rank sends.
    """
    rows = []
    for name, summary in [("original", report.original_collectives)] + [(v.name, v.collectives) for v in report.variants]:
        counts = ", ".join(f"{op}×{n}" for op, n in summary.counts().items()) or "-"
        branches = sum(1 for c in summary.calls if c.branch)
        size, bus = summary.total_bytes(), summary.total_bus_bytes()
        rows.append([name, summary.count, counts, f"{branches} in branches, {summary.count - branches} outside",
                     "?" if size is None else format_count(size, "B"), "?" if bus is None else format_count(bus, "B")])
    return ["graph", "collectives", "ops", "where", "bytes per call", "bus bytes per rank"], rows


def formula_lines(report: InspectionReport) -> list[str]:
    lines = [f"FLOPs(original) = {formula(report.original_flops.expr)} = {format_count(report.original_flops.value)}"]
    for v in report.variants:
        lines.append(f"FLOPs({v.name}) = {formula(v.flops.expr)} = {format_count(v.flops.value)}"
                     f" = {report.flop_ratio(v):.3g} × original")
        lines += [f"  note ({v.name}): {note}" for note in v.notes]
    memory = report.variants[0].cache if report.variants else None
    if memory is not None and memory.value:
        lines.append(f"cache memory (runtime-owned buffers) = {formula(memory.expr)} bytes"
                     f" = {format_count(memory.value, 'B')}")
    return lines


def _shorten(ops: str, keep: int = 8) -> str:
    items = ops.split(", ")
    return ops if len(items) <= keep else ", ".join(items[:keep]) + f", … {len(items) - keep} more"


def change_rows(report: InspectionReport, by_module: bool = False) -> tuple[list[str], list[list]]:
    rows = [[v.name, *row[:-1], _shorten(row[-1])] for v in report.variants for row in v.diff.grouped(by_module)]
    return ["variant", "change", "kind", "module" if by_module else "block", "nodes", "ops"], rows


def render_text(report: InspectionReport, *, nodes: bool = False, code_diff: bool = False) -> str:
    """The whole report as text; ``nodes`` lists changes per module, ``code_diff`` adds unified diffs."""
    parts = [f"model: {report.title} · {summary_line(report)}"]
    if report.frames:
        parts.append("\nGRAPH BREAKS: " + "\n  ".join(report.frames))
    if report.fallback:
        parts.append(f"\nFALLBACK: policy {report.policy} compiles this graph plainly: {report.fallback}")

    def table(title: str, headers: list[str], rows: list[list]) -> None:
        parts.append(f"\n{title}\n" + (tabulate(rows, headers=headers) if rows else "(none)"))

    table("Residual branches", *branch_rows(report))
    table("Attention sites", *attention_rows(report))
    table("Variants (compared with the original graph)", *variant_rows(report))
    if report.original_collectives.count:
        table("Collectives per call (context parallelism; bytes by formula from traced shapes)",
              *collective_rows(report))
    parts.append("\n" + "\n".join(formula_lines(report)))
    table("Changes by kind and " + ("module" if nodes else "block"), *change_rows(report, by_module=nodes))
    if code_diff:
        for v in report.variants:
            parts.append(f"\nGraph code diff: {v.name}\n" + (v.diff.code_diff or "(identical)"))
    return "\n".join(parts) + "\n"
