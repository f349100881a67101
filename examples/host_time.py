"""Runtime host time per denoiser call on the reference model (our target: under 1 ms).

Why: at batch 1 a cached step costs a few ms, so a runtime that spends a millisecond of
Python per call (step detection, scoring, bookkeeping) would eat a large share of the saving.
The runtime measures it itself (``stats()['host_ms_per_call']``: call time minus time inside
the compiled variants); this script samples 28-step CFG trajectories (one image, denoiser
batch 2) and prints it per policy.  ``--profile`` adds a cProfile of the runtime's calls.

    python examples/host_time.py --compiler inductor --threads 1
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats

import torch

from specdiff_fx import get_runtime
from specdiff_fx.backend import make_backend
from specdiff_fx.reference import load_reference_model, sample


def measure(policy: str, compiler: str, samples: int, steps: int, profile: bool, device: str = "cpu") -> dict:
    model = load_reference_model(device)
    torch._dynamo.reset()
    compiled = torch.compile(model.transformer, backend=make_backend(policy=policy, compiler=compiler),
                             dynamic=False, fullgraph=True)
    with torch.no_grad():
        sample(model, [0], num_steps=steps, transformer=compiled, seed=0, device=device)  # warm-up (compiles)
        runtime = get_runtime(compiled)
        runtime.reset()
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        for seed in range(1, samples + 1):
            sample(model, [seed % 6], num_steps=steps, transformer=compiled, seed=seed, device=device)
        if prof:
            prof.disable()
    stats = runtime.stats()
    out = {"policy": policy, "compiler": compiler, "device": device, "calls": stats["calls"], "host_ms_per_call": stats["host_ms_per_call"]}
    if prof:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        out["profile"] = text.getvalue()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="fora,specdiff")
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="JSON path for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for policy in args.policies.split(","):
        result = measure(policy, args.compiler, args.samples, args.steps, args.profile, args.device)
        profile = result.pop("profile", None)
        print(json.dumps(result))
        results.append(result)
        if profile:
            print(profile)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
