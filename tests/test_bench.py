"""`specdiff-fx bench`: the quick CLI run end to end, and the bench's pieces on their own."""

import argparse
import json
import math
import statistics

import pytest
import torch

from specdiff_fx.bench import command
from specdiff_fx.bench.anchors import auto_threshold, skip_share
from specdiff_fx.bench.methods import Method, StepCounts
from specdiff_fx.bench.metrics import peak_memory_mb, ssim
from specdiff_fx.bench.plot import _numbered, _spread, pareto_front, pareto_plot

EXPECTED_LABELS = [
    "baseline", "specdiff cr=0.5", "specdiff cr=0.7", "specdiff cr=0.8", "specdiff-forecast cr=0.7",
    "specdiff-forecast cr=0.5 every=2", "specdiff-forecast cr=0.9 every=3 full=5,9,14,20",
    "specdiff-forecast cr=0.9 every=3 full=5,9,14,20 kv", "fora interval=2", "fora interval=3", "taylor interval=2",
    "taylor interval=3", "taylor interval=4",
    "taylor interval=5", "taylor interval=4 order=2", "taylor-lite interval=4", "taylor-lite interval=5",
    "taylor-lite interval=6", "taylor-lite interval=7", "taylor-lite full=5,10,15,20", "taylor-lite full=5,9,14,20",
    "taylor-lite full=6,13,20", "taylor-lite full=6,13,20 hermite s=0.7", "taylor-lite full=6,13,20 fitted",
    "taylor-lite full=5,9,14,20 hermite s=0.7", "taylor-lite full=5,9,14,20 fitted", "taylor-lite interval=7 tol=0.3",
    "diffusers-firstblockcache", "diffusers-taylorseer", "diffusers-taylorseer-lite",
    "diffusers-taylorseer interval=5", "diffusers-taylorseer-lite interval=5", "diffusers-magcache",
    "cache-dit-dbcache", "cache-dit-dbcache-taylorseer", "cache-dit-dbcache-taylorseer skip=0.75",
]
# one row of each kind of method the bench builds (every policy's row builder, forecaster, tolerance,
# anchor): the end-to-end run runs these; every row's label is checked without running it
RUN_LABELS = [
    "baseline", "specdiff cr=0.7", "specdiff-forecast cr=0.5 every=2",
    "specdiff-forecast cr=0.9 every=3 full=5,9,14,20 kv", "fora interval=2", "taylor interval=2",
    "taylor interval=4 order=2", "taylor-lite interval=4", "taylor-lite full=5,9,14,20",
    "taylor-lite full=6,13,20 hermite s=0.7", "taylor-lite full=6,13,20 fitted", "taylor-lite interval=7 tol=0.3",
    # a name selects every row of that name: diffusers-taylorseer's two intervals
    "diffusers-firstblockcache", "diffusers-taylorseer", "diffusers-taylorseer interval=5",
    "diffusers-taylorseer-lite interval=5", "diffusers-magcache",
    "cache-dit-dbcache", "cache-dit-dbcache-taylorseer skip=0.75",
]
REQUIRED = ("method", "config", "speedup", "psnr", "ssim", "accuracy", "fd", "peak_mem_mb", "compile_s",
            "recompiles")


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_quick_bench_cli_runs_one_row_of_each_kind(tmp_path, capsys):
    from specdiff_fx.cli import main

    out, png = tmp_path / "bench.json", tmp_path / "pareto.png"
    selection = [label for label in RUN_LABELS[1:] if label != "diffusers-taylorseer interval=5"]
    rc = main(["bench", "--quick", "--no-progress", "--json", str(out), "--plot", str(png),
               "--methods", ";".join(selection)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "speed-up" in stdout and "PSNR dB" in stdout and "diffusers-taylorseer" in stdout

    rows = json.loads(out.read_text())
    assert [r["label"] for r in rows] == RUN_LABELS
    for row in rows:
        assert all(key in row for key in REQUIRED), row
        if row["status"] != "ok":  # only a missing third-party package may skip a row
            assert row["family"] == "cache-dit" and row["status"] == "skipped" and row["reason"], row
            continue
        assert isinstance(row["config"], str) and row["config"]
        assert isinstance(row["speedup"], float) and 0 < row["speedup"] < 100
        assert 0.0 <= row["accuracy"] <= 1.0
        assert isinstance(row["fd"], float) and row["fd"] >= 0
        assert isinstance(row["peak_mem_mb"], float) and row["peak_mem_mb"] > 0
        assert isinstance(row["compile_s"], float) and row["compile_s"] >= 0
        assert isinstance(row["recompiles"], int) and row["recompiles"] >= 0
        assert row["steps"] == 6
        if row["method"] == "baseline":
            continue
        assert len(row["baseline_times_s"]) == 1 and row["speedup"] == pytest.approx(row["baseline_time_s"] / row["time_s"])
        if row["identical_to_baseline"]:
            assert row["psnr"] is None and row["ssim"] == pytest.approx(1.0)
        else:
            assert isinstance(row["psnr"], float) and 5 < row["psnr"] < 200
            assert -1.0 <= row["ssim"] <= 1.0

    base = rows[0]
    assert base["speedup"] == 1.0 and base["psnr"] is None and base["ssim"] is None
    assert base["full_steps"] == 6
    by_label = {r["label"]: r for r in rows}
    # the schedules that do not depend on data skip what they say
    assert by_label["fora interval=2"]["full_steps"] == 4  # warm-up 0, 1, then every 2nd: 2, 4
    assert by_label["diffusers-taylorseer"]["full_steps"] == 4  # 0,1,2 warm-up, then 4
    for label in ("specdiff cr=0.7", "specdiff-forecast cr=0.5 every=2"):
        assert by_label[label]["partial_steps"] > 0 and by_label[label]["info"].get("fallback") is None
    for label in RUN_LABELS:
        if label.startswith("taylor-lite full="):  # warm-up 0, 1, 2, then the listed steps below 6
            listed = [int(s) for s in label.split("full=")[1].split()[0].split(",")]
            assert by_label[label]["full_steps"] == 3 + sum(s < 6 for s in listed), label
            assert by_label[label]["info"].get("fallback") is None
        elif label.startswith("taylor"):  # warm-up 0, 1, 2, then every interval-th step from 3
            interval = int(label.split("interval=")[1].split()[0])
            expected = 3 + len(range(3, 6, interval))
            assert by_label[label]["full_steps"] == expected and by_label[label]["info"].get("fallback") is None
    for label in ("diffusers-firstblockcache", "cache-dit-dbcache"):
        if by_label[label]["status"] == "ok":
            assert "auto" in by_label[label]["config"] and by_label[label]["info"]["threshold"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_default_rows_are_every_method_with_its_label():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    rows = command.all_methods(command._resolve(parser.parse_args([])))
    assert [m.label for m in rows] == EXPECTED_LABELS
    assert set(RUN_LABELS) <= set(EXPECTED_LABELS)


# ----------------------------------------------------------------------------- pieces
def test_auto_threshold_finds_the_smallest_threshold_reaching_the_target():
    calls = []

    def share(threshold):  # skipped share grows with the threshold, reaches 0.5 at 0.2
        calls.append(threshold)
        return min(1.0, threshold / 0.4)

    threshold, reached = auto_threshold(share, 0.5)
    assert reached >= 0.5 and threshold == pytest.approx(0.2, rel=0.05)
    assert len(calls) <= 10
    assert auto_threshold(lambda th: 0.0, 0.5) == (4.0, 0.0)  # unreachable target: largest threshold


def test_skip_share():
    assert skip_share(StepCounts(steps=28, full=14)) == 0.5
    assert skip_share(StepCounts()) == 0.0


def test_make_groups_reproduces_sample_noise_and_cycles_labels():
    groups = command.make_groups(5, 2, num_classes=3, image_shape=(3, 32, 32))
    assert [g[0].tolist() for g in groups] == [[0, 1], [2, 0], [1]]
    noise = torch.cat([g[1] for g in groups])
    for seed in range(5):  # what sample(..., seed=seed) draws for one image
        expected = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(noise[seed : seed + 1], expected)


def _methods():
    noop = lambda wl: None  # noqa: E731
    return [Method("baseline", "baseline", "baseline", noop), Method("fora", "fora interval=2", "specdiff-fx", noop),
            Method("fora", "fora interval=3", "specdiff-fx", noop),
            Method("diffusers-magcache", "diffusers-magcache", "diffusers", noop)]


def test_select_methods_keeps_the_baseline_and_rejects_unknown_names():
    methods = _methods()
    assert [m.label for m in command.select_methods(methods, None)] == [m.label for m in methods]
    assert [m.label for m in command.select_methods(methods, "diffusers-magcache")] == [
        "baseline", "diffusers-magcache"]
    assert [m.label for m in command.select_methods(methods, "fora interval=3")] == ["baseline", "fora interval=3"]
    assert len(command.select_methods(methods, "fora")) == 3
    with pytest.raises(ValueError, match="unknown"):
        command.select_methods(methods, "nope")


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.rand((2, 3, 32, 32), generator=g) * 2 - 1
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a + 0.3 * torch.randn(a.shape, generator=g), a) < 0.9


def test_cpu_peak_memory_sees_tensor_allocations():
    big = 32 * 2**20

    def fn():
        x = torch.ones(big // 4)  # float32: 32 MiB
        return float(x.sum())

    peak = peak_memory_mb(fn, torch.device("cpu"), held_bytes=2**20)
    assert 33 <= peak < 40


def _row(label, family, speedup, psnr, status="ok", identical=False):
    row = {k: None for k in command.ROW_KEYS}
    row.update(method=label.split()[0], label=label, family=family, status=status, config="c", speedup=speedup,
               time_s=1.0 / speedup if speedup else None, psnr=psnr, ssim=0.9, accuracy=1.0, fd=1.0,
               peak_mem_mb=10.0, compile_s=0.0, recompiles=0, steps=28, full_steps=14.0, partial_steps=None,
               identical_to_baseline=identical, info={}, workload={"steps": 28, "seeds": 2, "compiler": "inductor"},
               reason=None if status == "ok" else "package missing")
    return row


def test_pareto_front_and_plot(tmp_path):
    assert pareto_front([(1.5, 30.0), (2.0, 25.0), (1.2, 28.0), (2.0, 20.0)]) == [(1.5, 30.0), (2.0, 25.0)]
    rows = [_row("baseline", "baseline", 1.0, None), _row("fora interval=2", "specdiff-fx", 1.8, 31.0),
            _row("diffusers-magcache", "diffusers", 1.2, None, identical=True),
            _row("cache-dit-dbcache", "cache-dit", None, None, status="skipped")]
    path = tmp_path / "p.png"
    pareto_plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = command.format_table(rows)
    assert "SKIPPED: package missing" in table and "inf" in table and "ref" in table


def test_plot_numbers_rows_in_bench_order_and_spreads_coincident_labels():
    rows = [_row("baseline", "baseline", 1.0, None), _row("a", "specdiff-fx", 1.8, 31.0),
            _row("skipped", "cache-dit", None, None, status="skipped"), _row("b", "diffusers", 1.2, 30.0),
            _row("c", "diffusers", 1.3, None, identical=True)]
    assert [(n, r["label"]) for n, r in _numbered(rows)] == [(1, "a"), (2, "b"), (3, "c")]
    # three markers on one spot and one far away: the three labels get three different offsets
    offsets = _spread([(100.0, 100.0), (101.0, 99.0), (100.0, 100.0), (300.0, 300.0)], 9.0)
    assert len(set(offsets[:3])) == 3 and offsets[3] == offsets[0]


@pytest.mark.slow
def test_each_row_is_timed_against_its_own_paired_baseline_whose_compile_is_not_counted(tmp_path):
    from specdiff_fx.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--quick", "--compiler", "eager", "--repeats", "2", "--no-progress", "--json", str(out),
               "--methods", "fora interval=2,diffusers-firstblockcache"])
    assert rc == 0
    base, fora, fbc = json.loads(out.read_text())
    # a third-party cache compiled the same forward around its hooks: the pair still compiles its own
    assert fbc["status"] == "ok", fbc["reason"]
    assert fbc["speedup"] == pytest.approx(fbc["baseline_time_s"] / fbc["time_s"])
    assert base["baseline_times_s"] == base["times_s"] and base["speedup"] == 1.0
    assert len(fora["baseline_times_s"]) == 2 and fora["baseline_times_s"] != base["times_s"]
    assert fora["baseline_time_s"] == pytest.approx(statistics.median(fora["baseline_times_s"]))
    assert fora["speedup"] == pytest.approx(fora["baseline_time_s"] / fora["time_s"])
    # the paired baseline compiled a second frame of the same forward; the row does not count it
    assert fora["recompiles"] == 0 and fora["graphs"] == base["graphs"] == 1


def test_quick_defaults_and_explicit_options_win():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = command._resolve(parser.parse_args(["--quick", "--steps", "4"]))
    assert (args.steps, args.seeds, args.repeats, args.threads, args.compiler) == (4, 2, 1, 1, "none")
    assert math.isclose(args.guidance, command._default_guidance())
    full = command._resolve(parser.parse_args([]))
    assert (full.steps, full.repeats, full.threads, full.compiler) == (28, 3, 2, "inductor")
    with pytest.raises(ValueError):
        command._resolve(parser.parse_args(["--seeds", "0"]))
    with pytest.raises(ValueError, match="multiple"):
        command._resolve(parser.parse_args(["--seeds", "3", "--batch-size", "2"]))


def test_dbcache_row_is_skipped_with_a_reason_without_cache_dit(monkeypatch):
    import sys

    from specdiff_fx.bench.anchors import build_dbcache
    from specdiff_fx.bench.methods import SkipMethod

    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import fails as if not installed
    with pytest.raises(SkipMethod, match="pip install cache-dit"):
        build_dbcache(None)


def test_a_config_row_takes_any_registered_policy_and_checks_it_up_front():
    from specdiff_fx.bench.methods import config_method

    row = config_method("policy=sandwich front_blocks=1 back_blocks=0 interval=0 reset_steps=(6,13,20)")
    assert row.name == "sandwich" and row.family == "specdiff-fx"
    assert row.label == "sandwich front_blocks=1 back_blocks=0 interval=0 reset_steps=(6, 13, 20)"
    assert config_method("policy=fora compiler=eager").label == "fora"  # the run's --compiler decides
    with pytest.raises(ValueError, match="belongs to policy 'specdiff'"):
        config_method("policy=sandwich cache_ratio=0.5")
    with pytest.raises(ValueError, match="name the policy"):
        config_method("interval=3")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        config_method("policy=fora interval")
    args = argparse.Namespace(**{**vars(_default_args()), "config": ["policy=sandwich back_blocks=0"]})
    assert "sandwich back_blocks=0" in [m.label for m in command.all_methods(args)]


def _default_args():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args([])


def test_rows_are_scored_on_other_requests_against_the_baseline_on_the_same_request(tmp_path, capsys):
    """--across-guidance / --across-batch-size: the same seeds at other CFG scales and one image
    per call.  At the run's own CFG the score repeats the row's own PSNR (same seeds, same
    batches), so the column is the row's images on that request and nothing else."""
    from specdiff_fx.cli import main

    out = tmp_path / "bench.json"
    guidance = command._default_guidance()
    rc = main(["bench", "--quick", "--compiler", "eager", "--seeds", "4", "--batch-size", "2", "--no-progress",
               "--json", str(out), "--methods", "fora interval=2",
               "--across-guidance", f"1.5,{guidance:g},5", "--across-batch-size", "1"])
    assert rc == 0
    base, fora = json.loads(out.read_text())
    names = ["CFG 1.5", f"CFG {guidance:g}", "CFG 5", "batch 1"]
    assert list(base["across"]) == names and all(v is None for v in base["across"].values())
    assert list(fora["across"]) == names
    assert fora["across"][f"CFG {guidance:g}"] == pytest.approx(fora["psnr"], abs=1e-9)
    others = [fora["across"][n] for n in ("CFG 1.5", "CFG 5", "batch 1")]
    assert all(isinstance(v, float) and 5 < v < 200 for v in others), fora["across"]
    assert len({round(v, 6) for v in others}) == 3  # three requests, three different images
    stdout = capsys.readouterr().out
    assert "PSNR dB on other requests" in stdout and "batch 1" in stdout
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    with pytest.raises(ValueError, match="divide"):
        command._resolve(parser.parse_args(["--quick", "--seeds", "4", "--across-batch-size", "3"]))
    with pytest.raises(ValueError, match="> 0"):
        command._resolve(parser.parse_args(["--quick", "--across-guidance", "0"]))
