"""Warm start across processes through torch's own caches (docs: "Warm start").

A served model restarts often; its next process should reuse the compiled code of every
variant our backend compiles, through

1. Inductor's FX-graph cache: a second process with the same ``TORCHINDUCTOR_CACHE_DIR``
   hits the cache for each variant (no miss);
2. torch's mega-cache: process 1 saves ``torch.compiler.save_cache_artifacts()``, a process
   with a *fresh, empty* cache dir loads them with ``torch.compiler.load_cache_artifacts``
   before compiling, and its first call hits too.

Each process is a fresh interpreter (``sys.executable -c``): in-process state (dynamo's
caches, the in-memory FX graph cache) must play no part.  Three processes on a one-block tiny
DiT, ~90 s on 2 cores: the cold one (first call ~30 s), the warm one in the same dir (~13 s)
and the fresh dir with loaded artifacts (~29 s: on CPU Inductor still re-probes the vector ISA
and rebuilds the kernels' .so files from the cached source in an empty dir).  ``pytest -s``
shows the first-call seconds and the cache counters of each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.inductor, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MARK = "WARM_START_JSON "

# one process: (optionally load mega-cache artifacts), compile a tiny model with our backend,
# run 6 falling timesteps, (optionally save the artifacts), report counters and outputs
CHILD = r'''
import json, sys, time
import torch
from torch._dynamo.utils import counters
from specdiff_fx import get_runtime, make_backend
from specdiff_fx.testing.tiny_models import build_tiny

args = json.loads(sys.argv[1])
if args["load"]:
    with open(args["load"], "rb") as f:
        torch.compiler.load_cache_artifacts(f.read())
case = build_tiny(args["family"], **args["model"])
compiled = torch.compile(case.model, backend=make_backend(policy=args["policy"]), fullgraph=True, dynamic=False)
outs, first = [], None
with torch.no_grad():
    for i, t in enumerate([1000.0 - 150.0 * i for i in range(6)]):
        start = time.perf_counter()
        outs.append(case.output(compiled(**case.make_inputs(batch=2, timestep=t))).clone())
        if i == 0:
            first = time.perf_counter() - start
saved = None
if args["save"]:
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is not None:
        with open(args["save"], "wb") as f:
            f.write(artifacts[0])
        saved = {k: len(v) for k, v in artifacts[1].artifacts.items()}
torch.save(outs, args["out"])
stats = get_runtime(compiled).stats()
print(%(mark)r + json.dumps({
    "first_call_s": first,
    "inductor": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
    "aot_autograd": {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")},
    "variants": len(get_runtime(compiled).variants),
    "fallback": stats["fallback"],
    "cached_steps": stats["cached_steps"],
    "saved_artifacts": saved,
}))
''' % {"mark": MARK}


def run_child(tmp_path: Path, name: str, cache_dir: Path, *, policy: str = "taylor", family: str = "dit",
              model: dict | None = None, load: Path | None = None, save: Path | None = None) -> dict:
    env = dict(os.environ)
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache_dir), TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    out = tmp_path / f"{name}.pt"
    model = {"layers": 1} if model is None and family == "dit" else (model or {})  # one block: faster cold compile
    args = dict(policy=policy, family=family, model=model, out=str(out), load=str(load) if load else None,
                save=str(save) if save else None)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert lines, f"{name} printed no report:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(lines[-1][len(MARK):])
    report["outputs"] = torch.load(out)
    print(f"\n[warm start] {name}: first call {report['first_call_s']:.2f} s, inductor {report['inductor']}, "
          f"aot_autograd {report['aot_autograd']}, variants {report['variants']}, "
          f"cached_steps {report['cached_steps']}")
    return report


def assert_all_hit(report: dict) -> None:
    """Every variant from the cache.  A miss here when the cold process compiled the same
    variants means a variant's cache key differs between processes (TORCH_LOGS=
    "+torch._inductor.codecache,+torch._functorch._aot_autograd.autograd_cache" prints the
    hash details of each key: diff them between the two processes)."""
    fx = report["inductor"]
    assert report["cached_steps"] > 0
    assert fx.get("fxgraph_cache_bypass", 0) == 0, fx
    assert fx.get("fxgraph_cache_miss", 0) == 0, f"a variant missed the cache in a warm process: {fx}"
    assert fx.get("fxgraph_cache_hit", 0) >= report["variants"] == 2, fx


def assert_same_outputs(a: dict, b: dict) -> None:
    assert len(a["outputs"]) == len(b["outputs"]) == 6
    for i, (x, y) in enumerate(zip(a["outputs"], b["outputs"])):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {i}: {m}")


def test_warm_start_hits_fx_graph_cache_and_mega_cache(tmp_path):
    cache = tmp_path / "inductor_cache"
    artifacts = tmp_path / "artifacts.bin"

    cold = run_child(tmp_path, "cold", cache, save=artifacts)
    assert cold["fallback"] is None and cold["variants"] == 2  # taylor: record (full) + forecast
    assert cold["cached_steps"] > 0
    assert cold["inductor"].get("fxgraph_cache_hit", 0) == 0  # the cache dir was fresh
    assert cold["inductor"].get("fxgraph_cache_bypass", 0) == 0
    assert cold["saved_artifacts"] and artifacts.stat().st_size > 0

    # 1. same cache dir, new process: every variant from the FX graph cache
    warm = run_child(tmp_path, "warm_same_dir", cache)
    assert_all_hit(warm)
    assert_same_outputs(cold, warm)

    # 2. a fresh, empty cache dir plus process 1's mega-cache artifacts
    loaded = run_child(tmp_path, "fresh_dir_loaded_artifacts", tmp_path / "inductor_cache_fresh", load=artifacts)
    assert_all_hit(loaded)
    assert_same_outputs(cold, loaded)
