"""The tuner (specdiff_fx/tune.py): candidate schedules, the step-cost model, re-pointing
runtimes without recompiling, the choice for a speed or a quality request, and its saved
config — through a real diffusers pipeline, and the CLI on the reference model."""

import json

import pytest
import torch

from tiny_pipelines import build_pipeline

from specdiff_fx import compile_pipeline, get_runtime, restore_pipeline, tune_pipeline
from specdiff_fx.quality import psnr
from specdiff_fx.tune import (
    SPEED_SLACK, OtherSteps, Schedule, StepCosts, _apply, candidate_schedules, configure, full_steps_at, load_config,
    tune,
)


@pytest.mark.parametrize("steps", [12, 28, 50])
def test_candidate_schedules_have_the_asked_full_counts_inside_the_trajectory(steps):
    counts = [4, 6, 8]
    found = candidate_schedules(steps, counts)
    assert len(found) == len(set(found)) > len(counts)
    for sched in found:
        assert sched.full_steps(steps) in counts
        assert list(sched.full) == sorted(set(sched.full))
        assert all(sched.warmup <= s < steps for s in sched.full)
    # a shape > 1 spreads gaps that grow along the trajectory
    grow = candidate_schedules(steps, [7], warmups=[3], shapes=[1.3])[0]
    gaps = [b - a for a, b in zip((2, *grow.full), grow.full)]
    assert gaps[-1] > gaps[0], grow


def test_step_cost_model_interpolates_the_two_measured_runs():
    costs = StepCosts(uncached=10.0, all_full=10.4, one_full=1.4, num_steps=10)
    assert costs.run_seconds(10) == pytest.approx(10.4)
    assert costs.run_seconds(1) == pytest.approx(1.4)
    assert costs.run_seconds(4) == pytest.approx(10.4 - 6 * 1.0)
    assert costs.speedup(4) == pytest.approx(10.0 / 4.4)


STEPS = 10


def _setup(name="sd3", seeds=(0, 1, 2)):
    case = build_pipeline(name)
    reference = [case(s, num_inference_steps=STEPS) for s in seeds]
    compile_pipeline(case.pipe, policy="taylor", lite=True, compiler="eager", dynamic=False)

    def run(batches):
        return torch.cat([case(seeds[i], num_inference_steps=STEPS) for i in batches])

    return case, reference, run


def test_configure_changes_the_schedule_without_recompiling():
    case, reference, run = _setup()
    run([0])
    variants = dict(get_runtime(getattr(case.pipe, case.denoisers[0])).variants)
    steps = STEPS
    for warmup, full in ((steps, ()), (1, ()), (2, (4,))):
        configure(case.pipe, warmup_steps=warmup, interval=0, reset_steps=full)
        run([0])
        stats = get_runtime(getattr(case.pipe, case.denoisers[0])).stats()
        assert stats["full_steps"] == Schedule(warmup, full).full_steps(steps), stats["plan"]
    assert dict(get_runtime(getattr(case.pipe, case.denoisers[0])).variants) == variants, "no graph rebuilt"
    configure(case.pipe, warmup_steps=steps, interval=0, reset_steps=())
    torch.testing.assert_close(run([0]), reference[0], atol=1e-5, rtol=1e-5)
    restore_pipeline(case.pipe)


@pytest.mark.parametrize("request_kind", ["speedup", "min_psnr"])
def test_tune_chooses_by_the_request_and_its_saved_config_reproduces_the_choice(request_kind, tmp_path):
    case, reference, run = _setup()
    steps = STEPS
    costs = StepCosts(uncached=1.0, all_full=1.02, one_full=0.12, num_steps=steps)  # a synthetic machine
    ask = {"speedup": 1.8} if request_kind == "speedup" else {"min_psnr": 30.0}
    result = tune(case.pipe, run, reference, costs, fit_batches=[0], eval_batches=[1, 2],
                  full_counts=[4, 6], **ask)
    trials, chosen = result.trials, result.chosen
    assert {t.forecaster for t in trials} == {"taylor", "hermite", "fitted"}
    assert all(t.predicted_speedup == pytest.approx(costs.speedup(t.full_steps)) for t in trials)
    if request_kind == "speedup":
        fast = [t for t in trials if t.predicted_speedup >= 1.8 * (1 - SPEED_SLACK)]
        assert chosen in fast and chosen.psnr == max(t.psnr for t in fast)
    else:
        good = [t for t in trials if t.psnr >= 30.0]
        assert good, [t.psnr for t in trials]
        assert chosen in good and chosen.predicted_speedup == max(t.predicted_speedup for t in good)
    assert str(chosen.schedule) in result.table() and result.notes == []
    # the target is left on the choice
    chosen_out = run([1])
    stats = get_runtime(getattr(case.pipe, case.denoisers[0])).stats()
    assert stats["forecaster"] == chosen.forecaster and stats["full_steps"] == chosen.full_steps
    # the saved config, loaded into a fresh compile, gives the same output
    path = tmp_path / "tuned.json"
    result.save(str(path))
    saved = json.loads(path.read_text())["config"]
    assert saved["forecaster"] == chosen.forecaster
    # in the sampler's time: progress points for the full steps, a fitted table by progress
    assert saved["reset_steps"] == [] and len(saved["full_at"]) == len(chosen.schedule.full)
    if chosen.forecaster == "fitted":
        assert set(saved["forecaster_options"]) == {"coefficients_at"}
        assert saved["forecaster_options"]["coefficients_at"]["step_counts"] == [steps]
    restore_pipeline(case.pipe)
    compile_pipeline(case.pipe, load_config(str(path)), compiler="eager", dynamic=False)
    assert torch.equal(run([1]), chosen_out)
    restore_pipeline(case.pipe)


@pytest.mark.parametrize("request_kind", ["speedup", "min_psnr"])
def test_tune_with_a_timer_chooses_by_measured_speed(request_kind):
    """A machine slower than the step-cost model predicts (0.8x): the timed choice still meets a
    speed request by measurement, and a quality request takes the fastest timed candidate."""
    case, reference, run = _setup()
    costs = StepCosts(uncached=1.0, all_full=1.02, one_full=0.12, num_steps=STEPS)
    runtime = lambda: get_runtime(getattr(case.pipe, case.denoisers[0]))  # noqa: E731
    timed = []

    def timer():  # what the configured target would measure: 0.8 of its prediction
        before = runtime().stats()["full_steps"]
        run([1])
        full = runtime().stats()["full_steps"] - before
        timed.append(full)
        return 0.8 * costs.speedup(full)

    ask = {"speedup": 1.8} if request_kind == "speedup" else {"min_psnr": 30.0}
    result = tune(case.pipe, run, reference, costs, fit_batches=[0], eval_batches=[1, 2], full_counts=[3, 4, 6],
                  timer=timer, timed=3, **ask)
    chosen, measured = result.chosen, [t for t in result.trials if t.measured_speedup is not None]
    assert 1 <= len(measured) == len(timed) <= 3 and chosen in measured
    for t in measured:
        assert t.measured_speedup == pytest.approx(0.8 * t.predicted_speedup)
    assert "measured" in result.table()
    if request_kind == "speedup":
        assert chosen.measured_speedup >= 1.8 * (1 - SPEED_SLACK)
        # a trial only the model thought fast enough is never chosen over it by PSNR alone
        assert all(t.psnr <= chosen.psnr for t in measured if t.measured_speedup >= 1.8 * (1 - SPEED_SLACK))
    else:
        assert chosen.psnr >= 30.0
        assert chosen.measured_speedup == max(t.measured_speedup for t in measured)
    restore_pipeline(case.pipe)


def test_quality_request_tries_counts_from_the_fewest_up_and_stops_one_past_it():
    case, reference, run = _setup()
    costs = StepCosts(uncached=1.0, all_full=1.02, one_full=0.12, num_steps=STEPS)
    result = tune(case.pipe, run, reference, costs, fit_batches=[0], eval_batches=[1, 2], min_psnr=30.0,
                  forecasters=(("taylor", {}),))
    counts = sorted({t.full_steps for t in result.trials})
    assert counts == list(range(3, counts[-1] + 1))
    reached = min(t.full_steps for t in result.trials if t.psnr >= 30.0)
    assert counts[-1] in (reached + 1, STEPS - 1)
    assert result.chosen.psnr >= 30.0 and result.chosen.full_steps == reached
    restore_pipeline(case.pipe)


def test_tune_on_several_step_counts_scores_every_candidate_at_each_and_keeps_the_lowest(tmp_path):
    """One config for 10, 6 and 14 steps: each trial's PSNR at each count is what a run at that
    count gives, its full steps are what the runtime does there, the choice meets the quality
    request at every count, and the fitted forecaster is fitted on all three counts pooled."""
    seeds = (0, 1, 2)
    case = build_pipeline("sd3")
    counts = {m: [case(s, num_inference_steps=m) for s in seeds] for m in (STEPS, 6, 14)}
    compile_pipeline(case.pipe, policy="taylor", lite=True, compiler="eager", dynamic=False)
    runtime = lambda: get_runtime(getattr(case.pipe, case.denoisers[0]))  # noqa: E731

    def run_at(m):
        return lambda batches: torch.cat([case(seeds[i], num_inference_steps=m) for i in batches])

    costs = {m: StepCosts(uncached=m / 10, all_full=1.02 * m / 10, one_full=0.12 + 0.01 * m, num_steps=m)
             for m in counts}
    others = [OtherSteps(m, run_at(m), counts[m], costs[m]) for m in (6, 14)]
    result = tune(case.pipe, run_at(STEPS), counts[STEPS], costs[STEPS], fit_batches=[0], eval_batches=[1, 2],
                  full_counts=[4, 5], min_psnr=25.0, other_steps=others)
    for t in result.trials:
        assert list(t.at_steps) == [STEPS, 6, 14]
        assert t.psnr == min(s.psnr for s in t.at_steps.values())
        assert t.at_steps[STEPS].full_steps == t.full_steps
        assert t.at_steps[14].predicted_speedup == pytest.approx(costs[14].speedup(t.at_steps[14].full_steps))
    chosen = result.chosen
    assert chosen.psnr >= 25.0, result.table()
    assert chosen.predicted_speedup == max(t.predicted_speedup for t in result.trials if t.psnr >= 25.0)
    assert "PSNR@6" in result.table() and result.request == {"min_psnr": 25.0, "steps": [STEPS, 6, 14]}
    # the target is left on the choice: at each count a run gives the recorded full steps and PSNR
    for m, score in chosen.at_steps.items():
        before = runtime().stats()["full_steps"]
        out = run_at(m)([1, 2])
        assert runtime().stats()["full_steps"] - before == 2 * score.full_steps, m
        assert psnr(out, torch.cat(counts[m][1:])) == pytest.approx(score.psnr, abs=1e-9), m
    path = tmp_path / "tuned.json"
    result.save(str(path))
    saved = json.loads(path.read_text())
    assert set(saved["at_steps"]) == {"10", "6", "14"} and saved["psnr"] == chosen.psnr
    if chosen.forecaster == "fitted":
        assert saved["config"]["forecaster_options"]["coefficients_at"]["step_counts"] == [6, STEPS, 14]
    with pytest.raises(ValueError, match="given twice"):
        tune(case.pipe, run_at(STEPS), counts[STEPS], costs[STEPS], fit_batches=[0], eval_batches=[1], min_psnr=20.0,
             other_steps=[OtherSteps(STEPS, run_at(STEPS), counts[STEPS], costs[STEPS])])
    restore_pipeline(case.pipe)


def test_full_steps_at_counts_the_steps_a_schedule_makes_full():
    schedule = Schedule(2, (4, 6), (0.3, 0.5))
    even = [i / 10 for i in range(10)]  # progress 0, 0.1, ..., 0.9: 0.3 at step 3, 0.5 at step 5
    assert full_steps_at(schedule, even) == 4
    assert full_steps_at(schedule, [0.0, 0.4, 0.8]) == 3  # both points reached by steps 1 and 2; warm-up 0, 1
    assert full_steps_at(Schedule(2, (4, 6)), even) == 4  # in step indices


def test_tune_refuses_unclear_requests():
    costs = StepCosts(1.0, 1.0, 0.1, 10)
    with pytest.raises(ValueError, match="exactly one"):
        tune(None, None, [], costs)
    with pytest.raises(ValueError, match="exactly one"):
        tune(None, None, [], costs, speedup=2.0, min_psnr=30.0)
    with pytest.raises(ValueError, match="must differ"):
        tune(None, None, [], costs, speedup=2.0, fit_batches=[0], eval_batches=[0])
    with pytest.raises(ValueError, match="refine must be >= 0"):
        tune(None, None, [], costs, speedup=2.0, refine=-1)


@pytest.mark.slow
def test_tune_cli_on_the_reference_model(tmp_path):
    from specdiff_fx.bench.methods import tuned_method
    from specdiff_fx.cli import main

    out, report, png = tmp_path / "t.json", tmp_path / "t.md", tmp_path / "t.png"
    rc = main(["tune", "--speedup", "1.5", "--steps", "8,6", "--seeds", "4", "--batch-size", "2", "--threads", "1",
               "--compiler", "eager", "--repeats", "1", "--full-counts", "4,5", "--out", str(out),
               "--report", str(report), "--plot", str(png)])
    assert rc == 0
    saved = json.loads(out.read_text())
    assert saved["config"]["policy"] == "taylor" and saved["config"]["warmup_steps"] >= 2
    assert "PSNR@6" in report.read_text() and png.read_bytes()[:4] == b"\x89PNG"
    assert set(saved["at_steps"]) == {"8", "6"} and saved["psnr"] == min(s["psnr"] for s in saved["at_steps"].values())
    method = tuned_method(str(out))
    assert method.label == "taylor-lite tuned speedup=1.5, steps=[8, 6]"


# ----------------------------------------------------------------------------- a user's own pipeline
@pytest.mark.parametrize("name, ask", [("flux", {"psnr": 25.0}), ("sd3", {"speedup": 1.5})])
def test_tune_pipeline_on_the_users_own_calls_saves_a_config_that_reproduces_its_choice(name, ask, tmp_path):
    """The user's calls of pipe(...), nothing hand-built: the saved config, in the sampler's time,
    loaded into a fresh compile gives the chosen output again."""
    case = build_pipeline(name)
    steps = 10
    calls = [dict(case.kwargs(seed), num_inference_steps=steps) for seed in (0, 1, 2, 3)]
    compile_pipeline(case.pipe, policy="taylor", compiler="eager", dynamic=False)
    try:
        result = tune_pipeline(case.pipe, calls, full_counts=[4, 5], timed=0, **ask)
        chosen = result.chosen
        assert {t.forecaster for t in result.trials} == {"taylor", "hermite", "fitted"}
        assert all(3 <= t.full_steps < steps for t in result.trials)
        if "psnr" in ask:
            assert chosen.psnr >= 25.0 or result.notes
        config = result.config
        assert config["full_at"] and config["reset_steps"] == []
        chosen_out = case(3, num_inference_steps=steps)  # the pipeline is left on the choice
        assert get_runtime(getattr(case.pipe, case.denoisers[0])).stats()["full_steps"] == chosen.full_steps
        path = tmp_path / "tuned.json"
        result.save(str(path))
    finally:
        restore_pipeline(case.pipe)
    compile_pipeline(case.pipe, load_config(str(path)), compiler="eager", dynamic=False)
    try:
        assert torch.equal(case(3, num_inference_steps=steps), chosen_out)
    finally:
        restore_pipeline(case.pipe)


def test_tune_pipeline_rejects_what_it_cannot_tune():
    case = build_pipeline("sd3")
    with pytest.raises(ValueError, match="at least two calls"):
        tune_pipeline(case.pipe, [case.kwargs(0)], psnr=30)
    with pytest.raises(ValueError, match="same num_inference_steps"):
        tune_pipeline(case.pipe, [dict(case.kwargs(0), num_inference_steps=8), dict(case.kwargs(1))], psnr=30)
    compile_pipeline(case.pipe, policy="fora", compiler="eager", dynamic=False)
    try:
        with pytest.raises(ValueError, match="policy 'taylor'"):
            tune_pipeline(case.pipe, [dict(case.kwargs(s), num_inference_steps=8) for s in (0, 1)], psnr=30)
    finally:
        restore_pipeline(case.pipe)


# ----------------------------------------------------------------------------- refining the fit on the images
@pytest.mark.parametrize("sampler_time", [False, True])
def test_refine_forecaster_lowers_the_output_error_and_leaves_the_target_on_its_table(sampler_time):
    """Refinement searches the fitted table on the final outputs of the calibration calls: the
    error of those outputs falls (never rises), the target runs the returned table, and the
    table keeps its form (per step, or in the sampler's time)."""
    from specdiff_fx import fit_forecaster, refine_forecaster

    case, reference, run = _setup()
    configure(case.pipe, warmup_steps=2, interval=0, reset_steps=(5,), full_at=())
    fit_forecaster(case.pipe, lambda: run([0, 1]), sampler_time=sampler_time)
    want = torch.cat(reference[:2])
    before = float(torch.mean((run([0, 1]) - want) ** 2))
    runtime = get_runtime(getattr(case.pipe, case.denoisers[0]))
    fitted = dict(runtime.forecaster_options)
    options = refine_forecaster(case.pipe, lambda: run([0, 1]), want, sweeps=2)
    after = float(torch.mean((run([0, 1]) - want) ** 2))
    assert after < before, (before, after)
    assert set(options) == set(fitted) == {"coefficients_at" if sampler_time else "coefficients"}
    assert runtime.stats()["forecaster"] == "fitted" and runtime.forecaster_options == options != fitted
    restore_pipeline(case.pipe)


def test_refine_forecaster_needs_a_fitted_forecaster():
    from specdiff_fx import refine_forecaster

    case, reference, run = _setup()
    run([0])
    with pytest.raises(ValueError, match="fit_forecaster first"):
        refine_forecaster(case.pipe, lambda: run([0]), reference[0])
    restore_pipeline(case.pipe)


def test_tune_refines_the_best_fitted_trials_as_trials_of_their_own(tmp_path):
    case, reference, run = _setup()
    costs = StepCosts(uncached=1.0, all_full=1.02, one_full=0.12, num_steps=STEPS)
    result = tune(case.pipe, run, reference, costs, fit_batches=[0], eval_batches=[1, 2], full_counts=[4],
                  forecasters=(("fitted", {}),), min_psnr=99.0, refine=1)
    refined = [t for t in result.trials if t.refined]
    plain = [t for t in result.trials if not t.refined]
    assert len(refined) == 1 and refined[0].schedule == max(plain, key=lambda t: t.psnr).schedule
    source = next(t for t in plain if t.schedule == refined[0].schedule)
    assert refined[0].options != source.options and refined[0].forecaster == "fitted"
    assert "fitted (refined)" in result.table() and result.request["refine"] == 1
    # a refined choice saves a config that reproduces it
    result.chosen = refined[0]
    _apply(case.pipe, refined[0])
    chosen_out = run([1])
    path = tmp_path / "refined.json"
    result.save(str(path))
    assert json.loads(path.read_text())["refined"] is True
    restore_pipeline(case.pipe)
    compile_pipeline(case.pipe, load_config(str(path)), compiler="eager", dynamic=False)
    assert torch.equal(run([1]), chosen_out)
    restore_pipeline(case.pipe)
