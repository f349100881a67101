"""Warm start: a restarted process reuses the compiled variants through torch's own caches.

Why: our backend compiles several variants of the denoiser's graph with Inductor (a full
step that records the caches and a cached step that reuses or forecasts them), so a cold
process pays Inductor's compile time once per variant before its first image.  A served
model restarts often (deploys, autoscaling, crashes); the next process need not pay it again:

* Inductor's FX-graph cache (``TORCHINDUCTOR_CACHE_DIR``, on by default) already serves a
  process on the same machine / volume;
* torch's "mega-cache" carries it anywhere else: the process that compiled saves
  ``torch.compiler.save_cache_artifacts()`` (bytes), a new process with an empty cache dir
  (another host, a fresh container) calls ``torch.compiler.load_cache_artifacts(bytes)``
  *before* its first call, and that call loads every variant instead of compiling it.

Dynamo still traces and our passes still build the variants in the warm process (a few
seconds on a small model); only Inductor's compile is skipped.

    python examples/warm_start.py                        # both processes, prints cold vs warm
    python examples/warm_start.py --save artifacts.bin   # process A: compile, save artifacts
    python examples/warm_start.py --load artifacts.bin   # process B: load them, time the first call

Each process needs its own interpreter; the default mode runs A and B as subprocesses, each
with its own fresh temporary ``TORCHINDUCTOR_CACHE_DIR`` so B's hits can only come from the
artifacts.  ``--policy`` and ``--family`` pick the policy and the tiny model
(specdiff_fx/testing/tiny_models.py); with a real model, compile it the same way (same shapes,
``dynamic=False``, same backend config, same torch version): anything that changes the
graph or Inductor's config changes the cache keys.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run(policy: str, family: str, load: str | None, save: str | None, steps: int = 6) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from specdiff_fx import get_runtime, make_backend
    from specdiff_fx.testing.tiny_models import build_tiny

    if load:  # before anything compiles
        with open(load, "rb") as f:
            torch.compiler.load_cache_artifacts(f.read())
    case = build_tiny(family)
    compiled = torch.compile(case.model, backend=make_backend(policy=policy), fullgraph=True, dynamic=False)
    first = None
    with torch.no_grad():
        for i in range(steps):  # falling timesteps: the runtime infers the steps from them
            start = time.perf_counter()
            compiled(**case.make_inputs(batch=2, timestep=1000.0 * (1 - i / steps)))
            if i == 0:
                first = time.perf_counter() - start
    if save:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            raise SystemExit("nothing to save: was the FX graph cache off (TORCHINDUCTOR_FX_GRAPH_CACHE=0)?")
        with open(save, "wb") as f:
            f.write(artifacts[0])
    stats = get_runtime(compiled).stats()
    return {"first_call_s": round(first, 2), "variants": len(get_runtime(compiled).variants),
            "cached_steps": stats["cached_steps"],
            "fxgraph_cache": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}}


def child(args: list[str], cache_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", *args], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="taylor", help="taylor (default), fora, specdiff, ...")
    parser.add_argument("--family", default="dit", help="tiny model family (specdiff_fx/testing/tiny_models.py)")
    parser.add_argument("--save", help="process A: compile, then write the mega-cache artifacts here")
    parser.add_argument("--load", help="process B: load the artifacts from here before compiling")
    parser.add_argument("--json", action="store_true", help="print one JSON line (used by the default mode)")
    args = parser.parse_args()

    if args.save or args.load:
        result = run(args.policy, args.family, args.load, args.save)
        print(json.dumps(result) if args.json else
              f"first call {result['first_call_s']} s, {result['variants']} variants, "
              f"FX graph cache {result['fxgraph_cache']}, {result['cached_steps']} cached steps")
        return

    common = ["--policy", args.policy, "--family", args.family]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "artifacts.bin")
        cold = child([*common, "--save", path], os.path.join(tmp, "cache_a"))
        warm = child([*common, "--load", path], os.path.join(tmp, "cache_b"))  # fresh, empty cache dir
        size = os.path.getsize(path)
    print(f"policy {args.policy}, tiny {args.family}; artifacts {size / 1024:.0f} KiB")
    for name, r in (("A cold (compiles, saves)", cold), ("B fresh cache dir + artifacts", warm)):
        print(f"  {name:32s} first call {r['first_call_s']:6.2f} s   FX graph cache {r['fxgraph_cache']}")
    misses = warm["fxgraph_cache"].get("fxgraph_cache_miss", 0)
    print(f"  speed-up of the first call: {cold['first_call_s'] / warm['first_call_s']:.1f}x"
          + (f"  ({misses} of B's variants missed the cache and compiled)" if misses else ""))


if __name__ == "__main__":
    main()
