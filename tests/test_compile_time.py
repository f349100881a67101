"""``specdiff-fx compile-time``: each measurement a child process of its own, cold then warm on one
cache directory, rows parsed back and tabulated.  The eager compiler exercises the plumbing
(child processes, the regional clock, the JSON) without compiling anything real."""

from __future__ import annotations

import argparse
import json

import pytest

from specdiff_fx.bench import compile_time
from specdiff_fx.cli import main


def _ok(mode, method, cold_s, warm_s):
    def result(s, hits):
        return dict(mode=mode, method=method, status="ok", compile_s=s, steady_s=1.0, times_s=[1.0],
                    cache={"fxgraph_cache_hit": hits, "fxgraph_cache_miss": 2 - hits}, notes=[])

    return dict(mode=mode, method=method, cold=result(cold_s, 0), warm=result(warm_s, 2), cache_mb=1.0)


def test_table_ratios_and_error_rows():
    failed = dict(mode="regional", method="specdiff", status="error", reason="RuntimeError: boom", stderr="x\nboom")
    rows = [_ok("whole", "plain", 40.0, 4.0), _ok("whole", "taylor", 120.0, 10.0),
            dict(mode="regional", method="specdiff", cold=failed, warm=failed, cache_mb=0.0)]
    table = compile_time.format_table(rows)
    assert "3.00x" in table and "1.00x" in table
    assert "2/2" in table  # warm FX graph cache hits / lookups
    assert "ERROR: RuntimeError: boom" in table
    assert any("boom" in n for n in compile_time._note_lines(rows))


def test_unknown_method_is_refused():
    parser = argparse.ArgumentParser()
    compile_time.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--methods", "plain,nope"])
    args = parser.parse_args(["--methods", "plain,taylor", "--modes", "regional"])
    assert args.methods == ["plain", "taylor"] and args.modes == ["regional"]


@pytest.mark.slow
def test_eager_run_end_to_end(tmp_path, capsys):
    """Two child processes (cold, warm) of the regional row of the default policy: the
    plumbing, the regional clock driven by the sampler's callback, the JSON."""
    out = tmp_path / "ct.json"
    code = main(["compile-time", "--compiler", "eager", "--steps", "3", "--batch-size", "1", "--repeats", "1",
                 "--methods", "taylor", "--modes", "regional", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads(out.read_text())
    assert data["workload"]["compiler"] == "eager" and data["torch"] and data["machine"]["cpu_count"]
    rows = data["rows"]
    assert [(r["mode"], r["method"]) for r in rows] == [("regional", "taylor")]
    for phase in ("cold", "warm"):
        result = rows[0][phase]
        assert result["status"] == "ok", result
        assert result["compile_s"] >= 0 and result["steady_s"] > 0 and len(result["times_s"]) == 1
        # ours counted its steps, through the clock the sample callback drives
        assert result["full_steps"] == 3  # a 3-step trajectory is all warm-up (taylor: 3 full steps)
    assert data["plain_whole_cold_compile_s"] is None  # no plain whole row to divide by
    assert "cold compile s" in printed and "regional" in printed
