"""The cost model of ``specdiff-fx scale``: a trajectory's end-to-end speed-up from each step
kind's share of a plain step and each policy's schedule (full steps, cached or partial steps,
draft calls).  Pure arithmetic: it runs nothing, so it is tested on its own.
"""

from __future__ import annotations

SCHEDULE_STEPS = 28


TAYLOR_MODES = ("lite", "branch")  # lite=True, lite=False


# taylor schedules whose speed-up is predicted: (label, warmup_steps, interval, reset_steps);
# None: the policy's default (SpecDiffConfig), interval 0: warm-up and reset steps only.
TAYLOR_SCHEDULES = (
    ("default", None, None, None),
    ("full=5,9,14,20", 3, 0, (5, 9, 14, 20)),  # the reference schedule: 7 full of 28
    ("full=6,13,20", 3, 0, (6, 13, 20)),       # 6 full of 28
)


def forecast_speedup(record_share: float, forecast_share: float, full_steps: int,
                     steps: int = SCHEDULE_STEPS) -> float:
    """Speed-up of a ``steps``-step trajectory with ``full_steps`` record steps and forecast
    steps in between, from their shares of a plain step: N / (F·record + (N − F)·forecast)."""
    if not 0 < full_steps <= steps:
        raise ValueError(f"full_steps must be in 1..{steps}, got {full_steps}")
    return steps / (full_steps * record_share + (steps - full_steps) * forecast_share)


def taylor_full_steps(warmup_steps: int | None, interval: int | None, reset_steps: tuple[int, ...] | None,
                      steps: int = SCHEDULE_STEPS) -> int:
    """Full steps of ``steps`` under a taylor schedule (None fields: the policy's default)."""
    from ..config import SpecDiffConfig
    from ..runtime import FullStepSchedule

    cfg = SpecDiffConfig(policy="taylor", warmup_steps=warmup_steps, interval=interval, reset_steps=reset_steps)
    sched = FullStepSchedule(cfg.warmup_steps, cfg.interval or None, cfg.reset_steps)
    return sum(sched.is_full(s) for s in range(steps))


def schedule_costs(share: dict[str, float], ratios, steps: int = SCHEDULE_STEPS) -> dict:
    """End-to-end speed-up of a ``steps``-step trajectory from per-kind shares of a plain step."""
    from ..config import SpecDiffConfig
    from ..runtime import FullStepSchedule

    out = {}
    fora_cfg = SpecDiffConfig(policy="fora")
    sched = FullStepSchedule(fora_cfg.warmup_steps, fora_cfg.interval, fora_cfg.reset_steps)
    full = sum(sched.is_full(s) for s in range(steps))
    if "fora_full_record" in share and "fora_reuse" in share:
        cost = full * share["fora_full_record"] + (steps - full) * share["fora_reuse"]
        out["fora"] = {"full_steps": full, "speedup": steps / cost, "ideal_speedup": steps / full}
    sd_cfg = SpecDiffConfig(policy="specdiff")
    sched = FullStepSchedule(sd_cfg.warmup_steps, None, sd_cfg.reset_steps)
    full = sum(sched.is_full(s) for s in range(steps))
    drafts = max(sd_cfg.draft_steps - 1, 0)
    for ratio in ratios:
        tag = f"specdiff_partial_cr{ratio:g}"
        if tag not in share or "specdiff_full_record" not in share:
            continue
        draft = share.get("specdiff_draft", share["specdiff_full_record"])
        cost = full * share["specdiff_full_record"] + (steps - full) * share[tag] + drafts * draft
        ideal = full + (steps - full) * (1.0 - ratio) + drafts
        out[f"specdiff_cr{ratio:g}"] = {"full_steps": full, "draft_calls": drafts, "speedup": steps / cost,
                                        "ideal_speedup": steps / ideal}
    for mode in TAYLOR_MODES:
        rec, fc = f"taylor_{mode}_record", f"taylor_{mode}_forecast"
        if rec not in share or fc not in share:
            continue
        for label, warmup, interval, reset in TAYLOR_SCHEDULES:
            full = taylor_full_steps(warmup, interval, reset, steps)
            out[f"taylor_{mode} {label}"] = {"full_steps": full, "speedup": forecast_speedup(
                share[rec], share[fc], full, steps), "ideal_speedup": steps / full}
    return out
