"""Per-step cost by step kind on the reference model (the bench's batched setting), one process.

Why: a row's end-to-end speed-up hides which step kind costs what.  This times every denoiser
call of one CFG-batched sampling call (8 images, 28 steps), groups them by the kind the runtime
ran (full, forecast, partial, ...) and prints the median per kind against the plain Inductor
step, plus the runtime's own host time.  Used for the token-level breakdown in
docs/forecasting.md:

    TORCHINDUCTOR_CACHE_DIR=.cache/inductor python examples/step_costs.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdiff_fx import get_runtime, make_backend
from specdiff_fx.reference.model import load_reference_model, sample

CONFIGS = {
    "taylor-lite full=5,9,14,20": dict(policy="taylor", lite=True, interval=0, warmup_steps=3,
                                        reset_steps=(5, 9, 14, 20)),
    "specdiff-forecast cr=0.9 every=3 full=5,9,14,20": dict(
        policy="specdiff", c3="forecast", c2_share=0.0, cache_ratio=0.9, partial_every=3, interval=0,
        warmup_steps=3, reset_steps=(5, 9, 14, 20), kv_forecast=False),
    "same, kv_forecast": dict(policy="specdiff", c3="forecast", c2_share=0.0, cache_ratio=0.9, partial_every=3,
                              interval=0, warmup_steps=3, reset_steps=(5, 9, 14, 20), kv_forecast=True),
}


def timed(fn, log):
    def call(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        log.append(time.perf_counter() - start)
        return out
    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--runs", type=int, default=3, help="timed sampling calls after one warm-up call")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_reference_model()
    labels = torch.arange(args.images) % model.num_classes
    noise = torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    plain = torch.compile(model.transformer, backend="inductor", fullgraph=True, dynamic=False)
    log: list[float] = []
    with torch.no_grad():
        sample(model, labels, transformer=timed(plain, []), batch_cfg=True, noise=noise)
        for _ in range(args.runs):
            sample(model, labels, transformer=timed(plain, log), batch_cfg=True, noise=noise)
    plain_ms = 1000 * statistics.median(log)
    plain_total = 1000 * sum(log) / args.runs
    print(f"plain Inductor step: {plain_ms:.2f} ms (median of {len(log)} calls, batch {2 * args.images}); "
          f"denoiser time per trajectory {plain_total:.0f} ms")
    for name, config in CONFIGS.items():
        compiled = torch.compile(model.transformer, backend=make_backend(**config), fullgraph=True, dynamic=False)
        per_kind: dict[str, list[float]] = {}
        totals = []
        with torch.no_grad():
            sample(model, labels, transformer=compiled, batch_cfg=True, noise=noise)
            for _ in range(args.runs):
                log = []
                sample(model, labels, transformer=timed(compiled, log), batch_cfg=True, noise=noise)
                totals.append(1000 * sum(log))
                kinds = [e["calls"][0] for e in get_runtime(compiled).stats()["plan"]]
                for kind, t in zip(kinds, log):
                    per_kind.setdefault(kind, []).append(t)
        host = get_runtime(compiled).stats()["host_ms_per_call"]
        total = statistics.median(totals)
        print(f"\n{name}: host {host['median']:.2f} ms/call (median); denoiser time per trajectory "
              f"{total:.0f} ms ({plain_total / total:.2f}x plain)")
        for kind, ts in per_kind.items():
            ms = 1000 * statistics.median(ts)
            print(f"  {kind:9s} x{len(ts) // args.runs:2d}/trajectory  {ms:8.2f} ms  {ms / plain_ms:6.3f} of plain")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
