"""Where does a partial / full+record step spend its time beyond its compute share?

Why: issue 10 sets targets (partial at cache ratio 0.8 <= 0.25 of a plain step, full+record
<= 1.08) and the scale bench only says how far off we are.  This script builds the same
model as ``specdiff-fx scale`` (default: the issue's SD3 class, 4 layers x 384, 1024 image +
32 text tokens, CFG batch 2), compiles plain / full+record / partial with Inductor's kernel
profiling on (each fused C++ kernel is a profiler event named after the ops it fuses), and
prints the top kernels of each step kind under torch.profiler.

    python examples/profile_steps.py --threads 2 --ratio 0.8
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from specdiff_fx.bench import scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd3-medium")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    case = scale.build_model(args.family, args.resolution, layers=args.layers, width=args.width,
                             text_tokens=args.text_tokens)
    gm, inputs = scale.capture_graph(case)
    patches = {"cpp.enable_kernel_profile": True}
    plain = scale._inductor(gm, inputs, patches)
    group = scale.specdiff_group(gm, inputs, "inductor", args.ratio, with_full=True, draft=False,
                                 cfg_extra={"inductor_config": patches})
    fns = {"plain": lambda: plain(*inputs), **group.kinds}
    with torch.no_grad():
        for name, fn in fns.items():
            fn(), fn()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.calls):
                    fn()
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in events) / args.calls / 1000.0
            print(f"\n===== {name}: {total:.1f} ms of op self time per call")
            print(f"{'self ms/call':>12} {'calls/call':>10}  kernel or op")
            for e in events[:args.rows]:
                print(f"{e.self_cpu_time_total / args.calls / 1000.0:12.2f} {e.count / args.calls:10.0f}  {e.key[:110]}")


if __name__ == "__main__":
    main()
