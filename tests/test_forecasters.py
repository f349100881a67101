"""Forecasters of policy ``taylor`` (runtime/forecasters.py) and their fitting (calibrate.py).

Laws are checked against the arithmetic the record graph does (Newton's divided differences),
the runtime against the same graphs fed other coefficients, and fitting through real
diffusers pipelines and on the reference model.
"""

import json
import math

import pytest
import torch

from specdiff_fx import SpecDiffConfig, compile_pipeline, fit_forecaster, get_runtime, restore_pipeline
from specdiff_fx.runtime.forecasters import FORECASTERS, LeastSquares, coefficients, register, tune_candidates
from tiny_pipelines import build_pipeline

SCHEDULE = dict(warmup_steps=2, interval=3)  # full 0, 1, 2, 5, 8, ...: cached steps at k = 1, 2


def _recorded(values, xs):
    """F, D1, D2 as the record graph leaves them after full steps at ``xs`` (c0 = 1/d,
    c1 = 2/(d + d_prev), module docstring of passes/forecast_variants.py)."""
    f = values[0]
    d1 = d2 = 0.0
    for i in range(1, len(xs)):
        d1_new = (values[i] - f) / (xs[i] - xs[i - 1])
        if i >= 2:
            d2 = 2.0 / (xs[i] - xs[i - 2]) * (d1_new - d1)
        d1, f = d1_new, values[i]
    return f, d1, d2


def _forecast(name, xs, values, x, options=None):
    f, d1, d2 = _recorded(values, xs)
    gap = xs[-1] - xs[-2]
    a1, a2 = coefficients(name, x - xs[-1], gap, 0, options or {})
    return f + a1 * d1 + a2 * d2


@pytest.mark.parametrize("xs", [(0.0, 1.0, 2.0), (0.0, 3.0, 4.0), (2.0, 5.0, 9.0)])
def test_newton_is_exact_on_a_parabola_and_taylor_on_a_line(xs):
    parabola = lambda x: 0.3 * x * x - 1.2 * x + 2.0  # noqa: E731
    line = lambda x: -0.7 * x + 1.5  # noqa: E731
    for x in (xs[-1] + 1, xs[-1] + 2.5, xs[-1] + 4):
        assert _forecast("newton", xs, [parabola(v) for v in xs], x) == pytest.approx(parabola(x), rel=1e-12)
        assert _forecast("taylor", xs, [line(v) for v in xs], x) == pytest.approx(line(x), rel=1e-12)
    # taylor's k²/2 is not the interpolating parabola unless the last gap is 0: it misses
    x = xs[-1] + 2
    assert _forecast("taylor", xs, [parabola(v) for v in xs], x) != pytest.approx(parabola(x), rel=1e-3)


def test_hermite_damps_and_tends_to_taylor_order_one_terms():
    for k in (1.0, 2.0, 5.0):
        a1, _ = coefficients("hermite", k, 1.0, 0, {"sigma": 0.7})
        assert a1 == pytest.approx(0.49 * k)
        assert coefficients("hermite", k, 1.0, 0, {"sigma": 1.0})[0] == pytest.approx(k)


def test_fitted_reads_its_table_per_step_and_falls_back_to_taylor():
    table = {4: (0.25, -0.5)}
    assert coefficients("fitted", 2.0, 1.0, 4, {"coefficients": table}) == (0.25, -0.5)
    assert coefficients("fitted", 2.0, 1.0, 5, {"coefficients": table}) == coefficients("taylor", 2.0, 1.0, 5, {})


def test_a_law_that_is_not_finite_is_a_clear_error():
    @register("test_nan_law", 1, "for this test")
    def _nan(k, gap, step, options, progress):
        return math.nan, 0.0

    try:
        with pytest.raises(ValueError, match="test_nan_law.*non-finite"):
            coefficients("test_nan_law", 1.0, None, 3, {})
        with pytest.raises(ValueError, match="registered twice"):
            register("test_nan_law", 1, "again")(_nan)
    finally:
        FORECASTERS.pop("test_nan_law")


@pytest.mark.parametrize("order", [1, 2])
def test_least_squares_recovers_the_coefficients_that_made_the_data(order):
    g = torch.Generator().manual_seed(0)
    sums = LeastSquares(order)
    truth = {3: (0.6, -0.2), 7: (1.7, 0.9)}
    for step, (a1, a2) in truth.items():
        rows = []
        for _ in range(3):  # three targets
            d1, d2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
            r = a1 * d1 + (a2 * d2 if order == 2 else 0)
            rows.append((r, d1, d2 if order == 2 else None))
        sums.add(step, rows)
    fitted = sums.solve()
    for step, (a1, a2) in truth.items():
        assert fitted[step][0] == pytest.approx(a1, rel=1e-4)
        assert fitted[step][1] == pytest.approx(a2 if order == 2 else 0.0, abs=1e-4)


def test_least_squares_gives_a2_zero_where_d2_has_no_history_yet():
    sums = LeastSquares(2)
    d1 = torch.linspace(-1, 1, 20)
    sums.add(3, [(0.5 * d1, d1, torch.zeros(20))])
    assert sums.solve()[3] == pytest.approx((0.5, 0.0))


def test_fitted_in_the_samplers_time_scales_the_taylor_terms_by_interpolated_ratios():
    at = {"progress": [0.2, 0.6], "ratios": [[0.5, 0.0], [1.0, 2.0]]}
    opts = {"coefficients_at": at}
    assert coefficients("fitted", 2.0, 1.0, 7, opts, progress=0.2) == pytest.approx((1.0, 0.0))
    assert coefficients("fitted", 2.0, 1.0, 7, opts, progress=0.4) == pytest.approx((1.5, 2.0))  # halfway
    assert coefficients("fitted", 4.0, 1.0, 9, opts, progress=0.9) == pytest.approx((4.0, 16.0))  # past the end
    assert coefficients("fitted", 2.0, 1.0, 7, opts, progress=None) == coefficients("taylor", 2.0, 1.0, 7, {})
    # the same ratio at twice the distance in steps (50 steps instead of 25): twice the coefficient
    assert coefficients("fitted", 4.0, 2.0, 14, opts, progress=0.2)[0] == 2 * coefficients(
        "fitted", 2.0, 1.0, 7, opts, progress=0.2)[0]
    cfg = SpecDiffConfig(forecaster="fitted", forecaster_options={"coefficients_at": dict(at, step_counts=[28, 20])})
    assert cfg.forecaster_options["coefficients_at"]["step_counts"] == [20, 28]
    for bad in ({"progress": [0.6, 0.2], "ratios": [[1, 0], [1, 0]]}, {"progress": [0.2], "ratios": []},
                {"progress": [0.2]}):
        with pytest.raises(ValueError, match="coefficients_at"):
            SpecDiffConfig(forecaster="fitted", forecaster_options={"coefficients_at": bad})
    with pytest.raises(ValueError, match="one table"):
        SpecDiffConfig(forecaster="fitted", forecaster_options={"coefficients_at": at, "coefficients": {3: (1, 0)}})


def test_least_squares_in_the_samplers_time_fits_ratios_per_progress_point():
    sums = LeastSquares(order=1, sampler_time=True)
    d1 = torch.linspace(-1, 1, 20)
    # at progress 0.25 the residual is 0.6·k·D1 whether k is 2 (one trajectory) or 4 (a longer one)
    sums.add(5, [(0.6 * 2 * d1, d1, None)], progress=0.25, k=2.0)
    sums.add(9, [(0.6 * 4 * d1, d1, None)], progress=0.25, k=4.0)
    sums.add(11, [(1.5 * 3 * d1, d1, None)], progress=0.5, k=3.0)
    sums.add(12, [(d1, d1, None)], progress=None, k=1.0)  # no place in the sampler's time: ignored
    sums.note_step(("a", 0), 19)
    sums.note_step(("a", 1), 39)
    sums.note_step(("a", 1), 12)
    table = sums.solve_at()
    assert table["progress"] == [0.25, 0.5] and table["step_counts"] == [20, 40]
    assert table["ratios"][0] == pytest.approx([0.6, 0.0]) and table["ratios"][1] == pytest.approx([1.5, 0.0])


# ----------------------------------------------------------------------------- config
def test_a_new_forecaster_is_one_entry_the_config_and_tune_read():
    def check(options):
        if not 0 < options.get("damping", 0.5) < 1:
            raise ValueError(f"['damping'] must be in (0, 1), got {options['damping']!r}")
        return dict(options)

    @register("test_damped", 1, "for this test", options=("damping",), check=check, tune_options={"damping": 0.5})
    def _damped(k, gap, step, options, progress):
        return options.get("damping", 0.5) * k, 0.0

    try:
        cfg = SpecDiffConfig(forecaster="test_damped", forecaster_options={"damping": 0.25})
        assert cfg.forecaster_options == {"damping": 0.25}
        assert coefficients("test_damped", 2.0, None, 3, cfg.forecaster_options) == (0.5, 0.0)
        with pytest.raises(ValueError, match=r"forecaster_options of forecaster 'test_damped': \['damping'\]"):
            SpecDiffConfig(forecaster="test_damped", forecaster_options={"damping": 2})
        with pytest.raises(ValueError, match=r"\['sigma'\] do not apply to forecaster 'test_damped'"):
            SpecDiffConfig(forecaster="test_damped", forecaster_options={"sigma": 0.5})
        assert ("test_damped", {"damping": 0.5}) in tune_candidates()
    finally:
        FORECASTERS.pop("test_damped")
    assert [name for name, _ in tune_candidates()] == ["taylor", "hermite", "fitted"]


def test_config_names_what_is_wrong_with_a_forecaster():
    with pytest.raises(ValueError, match="forecaster must be one of"):
        SpecDiffConfig(forecaster="bdf9")
    with pytest.raises(ValueError, match="taylor_order=2"):
        SpecDiffConfig(forecaster="newton")
    with pytest.raises(ValueError, match=r"\['sigma'\] do not apply to forecaster 'taylor'"):
        SpecDiffConfig(forecaster_options={"sigma": 0.5})
    with pytest.raises(ValueError, match="sigma"):
        SpecDiffConfig(forecaster="hermite", forecaster_options={"sigma": -1})
    with pytest.raises(ValueError, match="fit_forecaster"):
        SpecDiffConfig(forecaster="fitted")
    with pytest.raises(ValueError, match="step -> \\(a1, a2\\)"):
        SpecDiffConfig(forecaster="fitted", forecaster_options={"coefficients": {"x": 1}})


def test_a_fitted_table_survives_json():
    table = {3: (0.5, 0.0), 4: (1.25, 0.1)}
    loaded = json.loads(json.dumps({"coefficients": table}))  # keys become strings, tuples lists
    cfg = SpecDiffConfig(forecaster="fitted", forecaster_options=loaded)
    assert cfg.forecaster_options["coefficients"] == table


def test_replace_keeps_an_explicit_lite_choice():
    assert SpecDiffConfig(lite=False).replace(interval=4).lite is False
    assert SpecDiffConfig().replace(probe=True).lite is False


# ----------------------------------------------------------------------------- runtime, pipelines
def _taylor_table(steps: int, order: int):
    """taylor's own (a1, a2) for every cached step of SCHEDULE (k = 1, 2 after each full step)."""
    table = {}
    for s in range(steps):
        if s >= 2 and (s - 2) % 3:
            k = float((s - 2) % 3)
            table[s] = (k, 0.5 * k * k if order == 2 else 0.0)
    return table


@pytest.mark.parametrize("name", ["sd3", "flux", "pixart_sigma"])
def test_the_runtime_writes_the_forecasters_coefficients_per_step(name):
    """Same graphs, other coefficients: taylor's own table reproduces taylor bit for bit;
    a scaled table changes the output; newton changes it too (order 2)."""
    case = build_pipeline(name)
    outs = {}
    runs = {
        "taylor": dict(forecaster="taylor"),
        "fitted=taylor": dict(forecaster="fitted", forecaster_options={"coefficients": _taylor_table(case.steps, 1)}),
        "fitted=half": dict(forecaster="fitted", forecaster_options={"coefficients": {
            s: (0.5 * a, 0.0) for s, a in ((s, a1) for s, (a1, _) in _taylor_table(case.steps, 1).items())}}),
    }
    for label, extra in runs.items():
        compile_pipeline(case.pipe, policy="taylor", compiler="eager", dynamic=False, **SCHEDULE, **extra)
        outs[label] = case(0)
        stats = get_runtime(getattr(case.pipe, case.denoisers[0])).stats()
        assert stats["forecaster"] == extra["forecaster"] and stats["cached_steps"] > 0
        restore_pipeline(case.pipe)
    assert torch.equal(outs["taylor"], outs["fitted=taylor"])
    assert not torch.allclose(outs["taylor"], outs["fitted=half"])


@pytest.mark.parametrize("name", ["sd3", "flux", "sd15"])
def test_calibration_runs_exact_steps_then_switches_to_the_fitted_table(name):
    case = build_pipeline(name)
    plain = case(0)
    compile_pipeline(case.pipe, policy="taylor", compiler="eager", dynamic=False, **SCHEDULE)
    calibrated = []
    table = fit_forecaster(case.pipe, lambda: calibrated.append(case(0)))
    # every step of the calibration run computed the network: the pipeline's own output
    torch.testing.assert_close(calibrated[0], plain, atol=1e-5, rtol=1e-5)
    cached = set(_taylor_table(case.steps, 1))
    assert set(table) == cached, "one (a1, a2) per cached step of the schedule"
    view = get_runtime(getattr(case.pipe, case.denoisers[0]))
    assert view.stats()["forecaster"] == "fitted"
    forecast = case(0)
    stats = view.stats()
    assert stats["cached_steps"] == len(cached), stats["plan"]
    assert torch.isfinite(forecast).all() and not torch.equal(forecast, plain)
    restore_pipeline(case.pipe)


def test_fit_forecaster_errors_are_clear():
    case = build_pipeline("sd3")
    compile_pipeline(case.pipe, policy="fora", compiler="eager", dynamic=False)
    with pytest.raises(ValueError, match="policy 'taylor'"):
        fit_forecaster(case.pipe, lambda: case(0))
    restore_pipeline(case.pipe)
    compile_pipeline(case.pipe, policy="taylor", compiler="eager", dynamic=False, interval=1)
    with pytest.raises(ValueError, match="no cached step"):
        fit_forecaster(case.pipe, lambda: case(0))
    restore_pipeline(case.pipe)


# ----------------------------------------------------------------------------- quality
def test_fitted_forecast_beats_taylor_with_six_full_steps_on_the_reference_model():
    """Fitted on calibration seeds, measured on others (the reference bench's 6-full-step
    schedule, lite): docs/forecasting.md, "Forecasters", has the full-size numbers."""
    from specdiff_fx import make_backend
    from specdiff_fx.bench.command import CALIBRATION_SEED_OFFSET
    from specdiff_fx.bench.methods import make_groups
    from specdiff_fx.quality import psnr
    from specdiff_fx.reference.model import load_reference_model, sample

    torch._dynamo.reset()
    model = load_reference_model()
    evaluate = make_groups(2, 2, model.num_classes, (3, 32, 32))
    calibrate = make_groups(2, 2, model.num_classes, (3, 32, 32), seed_offset=CALIBRATION_SEED_OFFSET)

    def run(den, groups):
        return torch.cat([sample(model, lab, num_steps=28, transformer=den, noise=noise) for lab, noise in groups])

    reference = run(model.transformer, evaluate)
    scores = {}
    for name in ("taylor", "fitted"):
        torch._dynamo.reset()
        backend = make_backend(policy="taylor", compiler="eager", lite=True, interval=0, warmup_steps=3,
                               reset_steps=(6, 12, 18))
        den = torch.compile(model.transformer, backend=backend, fullgraph=True, dynamic=False)
        if name == "fitted":
            fit_forecaster(den, lambda: run(den, calibrate))
        scores[name] = psnr(run(den, evaluate), reference)
        assert get_runtime(den).stats()["full_steps"] == 6
    print(scores)
    assert scores["fitted"] > scores["taylor"] + 1.0, scores
