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


def pareto_plot(rows: list[dict], path: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["family"] != "baseline"]
    finite = [r["psnr"] for r in ok if r["psnr"] is not None]
    top = (max(finite) if finite else 40.0) + 3.0  # where rows identical to the baseline are drawn
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=150)
    workload = (rows[0].get("workload") or {}) if rows else {}
    compiler = workload.get("compiler", "inductor")
    base_text = {"inductor": "plain Inductor", "eager": "torch.compile(eager)", "none": "not compiled"}.get(
        compiler, compiler)
    ax.axvline(1.0, color="0.5", ls="--", lw=1)
    ax.text(1.0, 0.02, f" baseline: uncached, {base_text}", transform=ax.get_xaxis_transform(),
            color="0.4", fontsize=8, rotation=90, va="bottom", ha="right")
    if any(r["identical_to_baseline"] for r in ok):
        ax.axhline(top, color="0.7", ls=":", lw=1)
        ax.text(0.99, top, "identical to baseline (PSNR = inf)", transform=ax.get_yaxis_transform(),
                color="0.4", fontsize=7, ha="right", va="bottom")
    points, seen = [], set()
    for r in ok:
        y = top if r["identical_to_baseline"] else r["psnr"]
        if y is None:
            continue
        x = r["speedup"]
        points.append((x, y))
        colour, marker = FAMILY_STYLE.get(r["family"], ("0.3", "^"))
        label = r["family"] if r["family"] not in seen else None
        seen.add(r["family"])
        ax.scatter([x], [y], color=colour, marker=marker, s=46, zorder=3, label=label)
        ax.annotate(r["label"], (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7.5)
    front = pareto_front(points)
    if len(front) > 1:
        xs, ys = zip(*front)
        ax.plot(xs, ys, color="0.25", lw=1, ls=":", zorder=2, label="Pareto front")
    ax.set_xlabel("wall-clock speed-up vs uncached baseline (x, higher is faster)")
    ax.set_ylabel("PSNR vs uncached baseline images (dB, higher is closer)")
    skipped = [r["label"] for r in rows if r["status"] != "ok"]
    if title is None:
        w = workload
        title = (f"specdiff-fx bench: {w.get('steps', '?')} steps, {w.get('seeds', '?')} seeds, "
                 f"median of {w.get('repeats', '?')}, {w.get('device', '?')}, {w.get('threads', '?')} thread(s), "
                 f"compiler {w.get('compiler', '?')}")
    ax.set_title(title, fontsize=10)
    if skipped:
        ax.text(0.99, 0.01, "did not run: " + ", ".join(skipped), transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7, color="0.4")
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(fontsize=8, loc="best")
        xs = [p[0] for p in points] + [1.0]
        ax.set_xlim(min(xs) * 0.9, max(xs) * 1.15)
    fig.tight_layout()
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
