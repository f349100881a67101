"""The scale benchmark: every step kind timed, shares and schedule arithmetic right, formula matches buffers."""

from __future__ import annotations

import json

import pytest

from specdiff_fx.bench import scale, scale_costs, scale_models
from specdiff_fx.cli import main


def _args(tmp_path, *extra):
    import argparse

    parser = argparse.ArgumentParser()
    scale.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"),
                              *extra])
    return scale.resolve(args)


def test_image_tokens():
    assert scale_models.image_tokens_for(1024) == 4096
    assert scale_models.image_tokens_for(512) == 1024
    with pytest.raises(ValueError):
        scale_models.image_tokens_for(1000)


def test_schedule_costs_arithmetic():
    shares = {"fora_full_record": 1.0, "fora_reuse": 0.0, "specdiff_full_record": 1.0,
              "specdiff_partial_cr0.8": 0.2, "specdiff_draft": 1.0}
    out = scale_costs.schedule_costs(shares, [0.8])
    # fora defaults: warm-up 0, 1, then every 3rd from step 2: 2, 5, ..., 26 -> 11 full of 28
    assert out["fora"]["full_steps"] == 11
    assert out["fora"]["speedup"] == pytest.approx(28 / 11)
    # specdiff defaults: warm-up 3 + reset at 14 = 4 full, 24 partial, 1 draft call
    sd = out["specdiff_cr0.8"]
    assert (sd["full_steps"], sd["draft_calls"]) == (4, 1)
    assert sd["speedup"] == pytest.approx(28 / (4 + 24 * 0.2 + 1))
    assert sd["speedup"] == pytest.approx(sd["ideal_speedup"])
    slower = scale_costs.schedule_costs(dict(shares, **{"specdiff_partial_cr0.8": 0.3}), [0.8])
    assert slower["specdiff_cr0.8"]["speedup"] < sd["speedup"]


def test_forecast_speedup_arithmetic():
    # N / (F * record + (N - F) * forecast)
    assert scale_costs.forecast_speedup(1.0, 0.0, 7) == pytest.approx(4.0)
    assert scale_costs.forecast_speedup(1.02, 0.03, 7, 28) == pytest.approx(28 / (7 * 1.02 + 21 * 0.03))
    assert scale_costs.forecast_speedup(1.0, 1.0, 6) == pytest.approx(1.0)
    assert scale_costs.forecast_speedup(1.1, 0.2, 28) == pytest.approx(1 / 1.1)
    with pytest.raises(ValueError):
        scale_costs.forecast_speedup(1.0, 0.1, 0)
    # taylor's default schedule: warm-up 0-2, then every 5th from step 3: 3, 8, 13, 18, 23
    assert scale_costs.taylor_full_steps(None, None, None) == 8
    # the reference schedule: 0-2, 5, 9, 14, 20; and 0-2, 6, 13, 20
    assert scale_costs.taylor_full_steps(3, 0, (5, 9, 14, 20)) == 7
    assert scale_costs.taylor_full_steps(3, 0, (6, 13, 20)) == 6
    shares = {"taylor_lite_record": 1.05, "taylor_lite_forecast": 0.02,
              "taylor_branch_record": 1.08, "taylor_branch_forecast": 0.2}
    out = scale_costs.schedule_costs(shares, [])
    assert set(out) == {f"taylor_{m} {label}" for m in ("lite", "branch") for label, *_ in scale_costs.TAYLOR_SCHEDULES}
    ref = out["taylor_lite full=5,9,14,20"]
    assert (ref["full_steps"], ref["ideal_speedup"]) == (7, pytest.approx(4.0))
    assert ref["speedup"] == pytest.approx(28 / (7 * 1.05 + 21 * 0.02))
    assert out["taylor_branch full=6,13,20"]["speedup"] == pytest.approx(28 / (6 * 1.08 + 22 * 0.2))
    assert out["taylor_lite default"]["speedup"] == pytest.approx(28 / (8 * 1.05 + 20 * 0.02))


def test_taylor_kinds_lite_and_branch(tmp_path):
    """Record and forecast steps of the default policy, both forecasting modes."""
    result = scale.run_scale(_args(tmp_path, "--policies", "taylor", "--layers", "4", "--repeats", "5",
                                   "--calls", "3", "--no-memory", "--plot", ""), log=lambda _: None)
    assert not result["errors"], result["errors"]
    kinds = result["kinds"]
    assert set(kinds) == {"plain", "taylor_lite_record", "taylor_lite_forecast",
                          "taylor_branch_record", "taylor_branch_forecast"}
    for mode in scale_costs.TAYLOR_MODES:
        assert kinds[f"taylor_{mode}_forecast"]["share"] < kinds[f"taylor_{mode}_record"]["share"], mode
    # lite skips whole blocks; per-branch forecasting still runs the gates and adaLN of every block.
    # The two are timed in different groups: compare the fastest rounds (robust to load spikes)
    assert min(kinds["taylor_lite_forecast"]["times_ms"]) < min(kinds["taylor_branch_forecast"]["times_ms"])
    lite, branch = result["groups"]["taylor lite"], result["groups"]["taylor branch"]
    assert lite["forecast_targets"] < branch["forecast_targets"] == branch["branches"]
    assert lite["cache_bytes"] < branch["cache_bytes"]
    sched = result["schedule"]
    assert [sched[f"taylor_lite {label}"]["full_steps"] for label, *_ in scale_costs.TAYLOR_SCHEDULES] == [8, 7, 6]
    ref = sched["taylor_lite full=5,9,14,20"]
    assert ref["speedup"] == pytest.approx(scale_costs.forecast_speedup(
        kinds["taylor_lite_record"]["share"], kinds["taylor_lite_forecast"]["share"], 7))


def test_quick_run_times_every_kind(tmp_path):
    result = scale.run_scale(_args(tmp_path), log=lambda _: None)
    assert not result["errors"]
    expected = {"plain", "fora_full_record", "fora_reuse", "specdiff_full_record", "specdiff_draft",
                "specdiff_partial_cr0.5", "specdiff_partial_cr0.8", "specdiff_partial_cr0.9",
                "taylor_lite_record", "taylor_lite_forecast", "taylor_branch_record", "taylor_branch_forecast"}
    assert set(result["kinds"]) == expected
    for kind, row in result["kinds"].items():
        assert row["ms"] > 0 and row["share"] > 0 and row["share_paired"] > 0, kind
        assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] > 0, kind
    assert result["kinds"]["specdiff_partial_cr0.8"]["ideal_share"] == pytest.approx(13 / 64)
    # SD3 joint attention: the 8 text tokens are computed at partial steps too
    assert result["kinds"]["specdiff_partial_cr0.8"]["token_share"] == pytest.approx((13 + 8) / (64 + 8))
    taylor = {f"taylor_{mode} {label}" for mode in scale_costs.TAYLOR_MODES for label, *_ in scale_costs.TAYLOR_SCHEDULES}
    assert set(result["schedule"]) == {"fora", "specdiff_cr0.5", "specdiff_cr0.8", "specdiff_cr0.9"} | taylor
    assert set(result["schedule_paired"]) == set(result["schedule"])
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["model"]["image_tokens"] == 64 and written["batch"] == 2
    assert (tmp_path / "s.png").stat().st_size > 0


def test_kv_formula_matches_runtime_buffers(tmp_path):
    result = scale.run_scale(_args(tmp_path, "--ratios", "0.8", "--no-fora", "--no-draft", "--no-memory"),
                             log=lambda _: None)
    group = result["groups"]["specdiff cr 0.8"]
    assert group["kv_cache_bytes"] / 2**20 == pytest.approx(result["kv_cache_formula_mb"])


@pytest.mark.parametrize("family", ["flux-dev", "pixart-sigma"])
def test_other_families_build_and_rewrite(tmp_path, family):
    result = scale.run_scale(_args(tmp_path, "--family", family, "--ratios", "0.8", "--no-fora", "--no-memory",
                                   "--plot", ""), log=lambda _: None)
    assert not result["errors"], result["errors"]
    assert result["kinds"]["specdiff_partial_cr0.8"]["ms"] > 0
    assert result["groups"]["specdiff cr 0.8"]["kv_cache_bytes"] / 2**20 == pytest.approx(
        result["kv_cache_formula_mb"])


def test_cli_scale_quick(tmp_path, capsys):
    rc = main(["scale", "--quick", "--ratios", "0.8", "--no-fora", "--no-draft", "--no-memory",
               "--out", str(tmp_path / "c.json"), "--plot", ""])
    assert rc == 0
    assert "specdiff_partial_cr0.8" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["compiler"] == "eager"


def test_cli_scale_policies(tmp_path, capsys):
    rc = main(["scale", "--quick", "--policies", "taylor", "--taylor-modes", "lite", "--no-memory",
               "--out", str(tmp_path / "t.json"), "--plot", ""])
    assert rc == 0
    out = capsys.readouterr().out
    assert "taylor_lite_forecast" in out and "taylor_branch" not in out and "specdiff_" not in out
    assert json.loads((tmp_path / "t.json").read_text())["policies"] == ["taylor"]
    with pytest.raises(SystemExit):
        main(["scale", "--quick", "--policies", "taylor,nope"])


def test_runtime_host_time_excludes_variant_time():
    """stats() reports the runtime's own Python per call; time inside a variant is not in it."""
    import time

    import torch

    from specdiff_fx.runtime import FULL, CachingRuntime

    def slow_variant(*args):
        time.sleep(0.02)
        return args[1]

    runtime = CachingRuntime(policy="off", variants={FULL: slow_variant}, timestep_index=0,
                              signature_indices=[1])
    x = torch.zeros(2, 3)
    for t in (900.0, 800.0, 700.0):
        start = time.perf_counter()
        runtime(torch.tensor([t]), x)
        assert time.perf_counter() - start >= 0.02
    host = runtime.stats()["host_ms_per_call"]
    assert host["calls"] == 3
    assert 0.0 < host["median"] < 5.0 and host["mean"] <= host["max"] < 20.0
    runtime.reset()
    assert runtime.stats()["host_ms_per_call"]["calls"] == 0


def test_attention_received_matmul_in_model_dtype():
    """The importance estimate keeps float32 inputs exact and, for bf16 inputs, multiplies
    in bf16 with a float32 softmax (the cheap record step on GPUs) without changing C1."""
    import torch

    from specdiff_fx.passes.token_ops import attention_received

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 40, 16, generator=g)
    k = torch.randn(2, 3, 48, 16, generator=g) * torch.linspace(0.2, 2.0, 48).reshape(1, 1, 48, 1)
    exact = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1).sum(dim=(1, 2))[:, 8:48]
    # keys × queries (aligned GEMM rows) sums each logit in another order than queries × keys:
    # float32 rounding apart, the same numbers
    assert torch.allclose(attention_received(q, k, 0.25, 8, 40), exact, rtol=1e-5, atol=1e-6)
    low = attention_received(q.bfloat16(), k.bfloat16(), 0.25, 8, 40)
    assert low.dtype == torch.float32
    bf16_logits = (k.bfloat16() @ q.bfloat16().transpose(-1, -2)).float()
    assert torch.allclose(low, torch.softmax(bf16_logits * 0.25, dim=-2).sum(dim=(1, 3))[:, 8:48])
    for row in range(2):
        top = set(exact[row].topk(8).indices.tolist())
        assert len(top & set(low[row].topk(8).indices.tolist())) >= 7
