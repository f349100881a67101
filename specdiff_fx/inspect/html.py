"""A self-contained HTML report: one file, no scripts, no external assets.

Blocks and code diffs are ``<details>`` elements, so a 30-layer model stays navigable
and the page works in any browser (and in ``chromium --dump-dom`` for tests).
"""

from __future__ import annotations

import difflib
from html import escape

from .graph_diff import code_lines
from .report import InspectionReport
from .text import attention_rows, branch_rows, formula_lines, summary_line, variant_rows

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px 32px; color: #1d1d1f; max-width: 1600px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 14px; margin: 14px 0 6px; color: #444; }
.meta { color: #555; margin: 0 0 12px; }
table.grid { border-collapse: collapse; margin: 4px 0 10px; }
table.grid th, table.grid td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
table.grid td { white-space: nowrap; } table.grid td.wrap { white-space: normal; }
table.grid th { background: #f3f4f6; font-weight: 600; }
table.grid td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
ul.formulas { padding-left: 18px; } ul.formulas li { margin: 2px 0; font-family: ui-monospace, monospace; font-size: 12.5px; }
details { border: 1px solid #ddd; border-radius: 6px; margin: 6px 0; padding: 4px 10px; background: #fff; }
details[open] { background: #fcfcfd; }
summary { cursor: pointer; padding: 3px 0; }
.pill { display: inline-block; border-radius: 10px; padding: 0 8px; margin-left: 4px; font-size: 12px;
        background: #e8eefc; color: #1f3f8f; }
.delta { float: right; color: #555; font-size: 12.5px; }
.st-computed { color: #166534; } .st-skipped { color: #6b7280; } .st-partial { color: #9a3412; }
.tag { font-size: 11.5px; background: #fef3c7; color: #7c4a03; border-radius: 4px; padding: 0 4px; }
.diffwrap, .scroll { overflow-x: auto; }
table.diff { border-collapse: collapse; width: 100%; font-family: ui-monospace, monospace; font-size: 11.5px; }
table.diff td { padding: 0 4px; vertical-align: top; }
.diff_header { background: #f3f4f6; color: #888; text-align: right; }
.diff_next { display: none; }
.diff_add { background: #c9f7d3; } .diff_chg { background: #fdf1b3; } .diff_sub { background: #fbd0d0; }
.legend span { padding: 0 6px; margin-right: 8px; }
"""


_WRAPPED_COLUMNS = {"ops", "branch", "kinds (meta['specdiff'])", "body FLOPs", "token-wise", "runs at"}


def _status_cell(text: str) -> str:
    state, _, tags = text.partition(" · ")
    css = "st-computed" if state == "computed" else "st-skipped" if state == "skipped" else "st-partial"
    tag_html = " ".join(f'<span class="tag">{escape(t)}</span>' for t in tags.split(", ") if t)
    return f'<span class="{css}">{escape(state)}</span> {tag_html}'.strip()


def _table(headers: list[str], rows: list[list], status_columns: int = 0) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = []
    first_status = len(headers) - status_columns
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            if i >= first_status:
                cells.append(f'<td class="wrap">{_status_cell(str(value))}</td>')
            elif isinstance(value, (int, float)):
                cells.append(f'<td class="num">{value}</td>')
            else:
                css = ' class="wrap"' if headers[i] in _WRAPPED_COLUMNS else ""
                cells.append(f"<td{css}>{escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="grid"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _block_section(report: InspectionReport, block: str, open_: bool) -> str:
    n_variants = len(report.variants)
    kinds = [b.branch.name.split(":", 1)[-1] for b in report.branches if b.branch.block == block]
    pills = "".join(f'<span class="pill">{escape(k)}</span>' for k in kinds)
    deltas = []
    for v in report.variants:
        counts = {k: sum(1 for c in v.diff.changes if c.block == block and c.change == k)
                  for k in ("added", "removed", "changed")}
        if any(counts.values()):
            deltas.append(f"{v.name}: +{counts['added']} −{counts['removed']} ~{counts['changed']}")
    summary = (f"<summary><code>{escape(block or '<root>')}</code>{pills}"
               f'<span class="delta">{escape(" · ".join(deltas) or "unchanged")}</span></summary>')
    parts = [summary]
    headers, rows = branch_rows(report, block)
    if rows:
        parts += ["<h3>Residual branches</h3>", _table(headers, rows, n_variants)]
    headers, rows = attention_rows(report, block)
    if rows:
        parts += ["<h3>Attention sites</h3>", _table(headers, rows, n_variants)]
    changes = [[v.name, *row] for v in report.variants for row in v.diff.grouped(by_module=True)
               if _in_block(row[2], block)]
    if changes:
        parts += ["<h3>Node changes</h3>",
                  _table(["variant", "change", "kind", "module", "nodes", "ops"], changes)]
    return f'<details class="block"{" open" if open_ else ""}>{"".join(parts)}</details>'


def _in_block(module: str, block: str) -> bool:
    module = "" if module == "<root>" else module
    return module == block or bool(block) and module.startswith(block + ".")


def _code_section(report: InspectionReport) -> str:
    differ = difflib.HtmlDiff(tabsize=4, wrapcolumn=80)
    original = code_lines(report.original)
    parts = []
    for v in report.variants:
        if not v.diff.code_diff:
            parts.append(f"<details><summary><code>{escape(v.name)}</code>: identical to the original graph"
                         "</summary></details>")
            continue
        lines = v.diff.code_diff.splitlines()[2:]
        plus = sum(1 for line in lines if line.startswith("+"))
        minus = sum(1 for line in lines if line.startswith("-"))
        table = differ.make_table(original, code_lines(v.graph), "original", v.name, context=True, numlines=2)
        parts.append(f"<details><summary><code>{escape(v.name)}</code> vs original: "
                     f"+{plus} −{minus} lines</summary><div class=\"diffwrap\">{table}</div></details>")
    legend = ('<p class="legend"><span class="diff_add">added</span><span class="diff_chg">changed</span>'
              '<span class="diff_sub">removed</span> (side by side: original left, variant right; '
              "unchanged stretches folded)</p>")
    return legend + "".join(parts)


def render_html(report: InspectionReport) -> str:
    """The report as one HTML page."""
    n_variants = len(report.variants)
    blocks = report.blocks()
    first_with_branches = next((b.branch.block for b in report.branches), None)
    block_html = "".join(_block_section(report, b, open_=(b == first_with_branches)) for b in blocks)
    headers, rows = variant_rows(report)
    formulas = "".join(f"<li>{escape(line)}</li>" for line in formula_lines(report))
    symbols = ("B batch · N image tokens · T text tokens · k token subset · d width · L layers of a "
               "repeated block group. FLOPs count matrix products (linear, conv, attention, matmul) "
               "at 2 per multiply-add, as torch.utils.flop_counter does. Token-wise: derived, the branch "
               "body has no attention, conv or group norm, so it could run on a subset of tokens.")
    all_branches = _table(*branch_rows(report), status_columns=n_variants)
    sites = _table(*attention_rows(report), status_columns=n_variants)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>specdiff-fx inspect: {escape(report.title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>specdiff-fx inspect: {escape(report.title)}</h1>
<p class="meta">{escape(summary_line(report))}</p>
{_fallback_html(report)}<h2>Variants</h2>
{_table(headers, rows)}
<ul class="formulas">{formulas}</ul>
<p class="meta">{escape(symbols)}</p>
<h2>Blocks ({len(blocks)})</h2>
{block_html}
<h2>All residual branches ({len(report.branches)})</h2>
{all_branches}
<h2>All attention sites ({len(report.attention)})</h2>
{sites}
<h2>Graph code diff</h2>
{_code_section(report)}
</body></html>
"""


def _fallback_html(report: InspectionReport) -> str:
    frames = ""
    if report.frames:
        items = "".join(f"<li>{escape(line)}</li>" for line in report.frames[1:])
        frames = (f'<p class="fallback"><strong>Graph breaks:</strong> {escape(report.frames[0])}</p>\n'
                  f"<ul>{items}</ul>\n")
    if not report.fallback:
        return frames
    return frames + (f'<p class="fallback"><strong>Fallback:</strong> policy {escape(report.policy)} compiles this '
            f"graph plainly: <code>{escape(report.fallback)}</code></p>\n")


def write_html(report: InspectionReport, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))

