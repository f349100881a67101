"""Pareto plot of a bench run: wall-clock speed-up (x) against PSNR vs the uncached baseline (y)."""

from __future__ import annotations

FAMILY_STYLE = {  # colour, marker
    "specdiff-fx": ("tab:red", "o"),
    "diffusers": ("tab:blue", "s"),
    "cache-dit": ("tab:green", "D"),
}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another (faster and at least as good, or as fast and better),
    sorted by speed-up."""
    front = []
    for p in points:
        dominated = any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in points)
        if not dominated:
            front.append(p)
    return sorted(set(front))


def _numbered(rows: list[dict]) -> list[tuple[int, dict]]:
    """The plotted rows (ran, not the baseline), numbered from 1 in the bench's row order: the
    numbers the plot draws and its key lists."""
    ok = [r for r in rows if r["status"] == "ok" and r["family"] != "baseline"]
    return [(i, r) for i, r in enumerate(ok, 1) if r["identical_to_baseline"] or r["psnr"] is not None]


def _spread(points: list[tuple[float, float]], min_gap: float) -> list[tuple[float, float]]:
    """Text offsets (points) for labels at ``points`` (display units): a label whose marker lies
    within ``min_gap`` of an earlier one goes round it on a ring, so coincident markers keep
    readable numbers."""
    offsets = []
    ring = [(5, 4), (5, -10), (-12, 4), (-12, -10), (5, 12), (-12, 12), (5, -18), (-12, -18)]
    for i, (x, y) in enumerate(points):
        near = sum(1 for (u, v) in points[:i] if abs(u - x) < min_gap and abs(v - y) < min_gap)
        offsets.append(ring[near % len(ring)])
    return offsets


def pareto_plot(rows: list[dict], path: str, title: str | None = None) -> None:
    """Speed-up against PSNR, one numbered marker per row; the key beside the axes gives each
    number's row label, speed-up and PSNR (a dozen rows crowd 3.5-4.5x and 30-33 dB, where
    their full labels would overlap)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    numbered = _numbered(rows)
    finite = [r["psnr"] for _, r in numbered if r["psnr"] is not None]
    top = (max(finite) if finite else 40.0) + 3.0  # where rows identical to the baseline are drawn
    fig = plt.figure(figsize=(13, 6.5), dpi=150)
    ax = fig.add_axes([0.06, 0.09, 0.56, 0.83])
    key = fig.add_axes([0.64, 0.02, 0.35, 0.94])
    key.axis("off")
    workload = (rows[0].get("workload") or {}) if rows else {}
    compiler = workload.get("compiler", "inductor")
    base_text = {"inductor": "plain Inductor", "eager": "torch.compile(eager)", "none": "not compiled"}.get(
        compiler, compiler)
    ax.axvline(1.0, color="0.5", ls="--", lw=1)
    ax.text(1.0, 0.02, f" baseline: uncached, {base_text}", transform=ax.get_xaxis_transform(),
            color="0.4", fontsize=8, rotation=90, va="bottom", ha="right")
    if any(r["identical_to_baseline"] for _, r in numbered):
        ax.axhline(top, color="0.7", ls=":", lw=1)
        ax.text(0.99, top, "identical to baseline (PSNR = inf)", transform=ax.get_yaxis_transform(),
                color="0.4", fontsize=7, ha="right", va="bottom")
    points, seen = [], set()
    for _, r in numbered:
        points.append((r["speedup"], top if r["identical_to_baseline"] else r["psnr"]))
        colour, marker = FAMILY_STYLE.get(r["family"], ("0.3", "^"))
        label = r["family"] if r["family"] not in seen else None
        seen.add(r["family"])
        ax.scatter([points[-1][0]], [points[-1][1]], color=colour, marker=marker, s=40, zorder=3, label=label)
    front = pareto_front(points)
    if len(front) > 1:
        xs, ys = zip(*front)
        ax.plot(xs, ys, color="0.25", lw=1, ls=":", zorder=2, label="Pareto front")
    if points:
        xs = [p[0] for p in points] + [1.0]
        ax.set_xlim(min(xs) * 0.9, max(xs) * 1.08)
        fig.canvas.draw()  # display coordinates are final once the limits are
        display = [tuple(ax.transData.transform(p)) for p in points]
        for (n, r), p, off in zip(numbered, points, _spread(display, 9.0)):
            ax.annotate(str(n), p, xytext=off, textcoords="offset points", fontsize=7,
                        color=FAMILY_STYLE.get(r["family"], ("0.3", "^"))[0], fontweight="bold")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel("wall-clock speed-up vs uncached baseline (x, higher is faster)")
    ax.set_ylabel("PSNR vs uncached baseline images (dB, higher is closer)")
    if title is None:
        w = workload
        title = (f"specdiff-fx bench: {w.get('steps', '?')} steps, {w.get('seeds', '?')} seeds, "
                 f"median of {w.get('repeats', '?')}, {w.get('device', '?')}, {w.get('threads', '?')} thread(s), "
                 f"compiler {w.get('compiler', '?')}")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    lines = [f"{n:>2}  {r['speedup']:5.2f}x  {'inf' if r['identical_to_baseline'] else format(r['psnr'], '5.2f'):>5} dB"
             f"  {r['label']}" for n, r in numbered]
    skipped = [r["label"] for r in rows if r["status"] != "ok"]
    if skipped:
        lines += ["", "did not run: " + ", ".join(skipped)]
    size = 7.5 if len(lines) <= 40 else max(4.5, 7.5 * 40 / len(lines))
    key.text(0.0, 1.0, "\n".join([" #  speed-up  PSNR   row"] + lines), va="top", ha="left", family="monospace",
             fontsize=size, transform=key.transAxes)
    fig.savefig(path)
    plt.close(fig)


def tune_plot(result, path: str) -> None:
    """The trials of a tune (``TuneResult``): predicted speed-up against PSNR, per forecaster, the
    Pareto front and the chosen one."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=130)
    for name in sorted({t.forecaster for t in result.trials}):
        pts = [(t.predicted_speedup, t.psnr) for t in result.trials if t.forecaster == name]
        ax.scatter(*zip(*pts), s=14, label=name, alpha=0.7)
    front = pareto_front([(t.predicted_speedup, t.psnr) for t in result.trials])
    ax.plot(*zip(*front), color="0.3", lw=1, label="Pareto front")
    ax.scatter([result.chosen.predicted_speedup], [result.chosen.psnr], s=120, facecolors="none", edgecolors="red",
               label="chosen")
    ax.set_xlabel("predicted speed-up vs uncached (measured step costs)")
    ax.set_ylabel("PSNR dB vs uncached (evaluation batches)")
    ax.set_title(f"specdiff-fx tune: {result.request}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
