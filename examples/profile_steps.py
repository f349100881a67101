"""Where does a partial / full+record step spend its time beyond its compute share?

Why: we set targets (partial at cache ratio 0.8 <= 0.25 of a plain step on CPU, <= 0.3 on
a GPU at SD3-medium shape; full+record <= 1.08) and the scale bench only says how far off we are.
This script builds the same model as ``specdiff-fx scale`` (default: the target CPU size, SD3
class, 4 layers x 384, 1024 image + 32 text tokens, CFG batch 2), compiles plain, full+record and
partial with Inductor, times them round-robin (median per call, as the scale bench does), and
then profiles a few calls of each under torch.profiler:

* on CPU, with Inductor's kernel profiling on, the top ops by self time (each fused C++ kernel is
  an event named after the ops it fuses);
* on CUDA, the top GPU kernels by device time, the kernel time per call against the wall time
  per call (a step whose kernels add up to much less than its wall time is launch-bound), and the
  device time per kernel class (GEMM, attention, Triton fused, other).

``--graphs`` (CUDA) also times each kind replayed from a CUDA graph captured around the same
compiled call (manual ``torch.cuda.graph`` capture: no launch cost, same kernels), the bound
that ``SpecDiffConfig(cudagraphs=True)`` and Inductor's cudagraph trees aim at.

``--fixed`` also builds a partial variant that computes only 2 image tokens: its cost is the part
of a partial step that does not shrink with the subset (text tokens, embeddings, adaLN, the exit
on all tokens, launches, our selection and composing).

    python examples/profile_steps.py --threads 2 --ratio 0.8
    python examples/profile_steps.py --device cuda --dtype bfloat16 --resolution 1024 --layers 24 \\
        --width 1536 --text-tokens 333 --fixed --json out/profile_cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from specdiff_fx.bench import scale_groups, scale_models, timing
from specdiff_fx.inspect.capture import capture_graph

KERNEL_CLASSES = (  # (class, substrings of a CUDA kernel name), first match wins
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "splitk")),
    ("triton", ("triton",)),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile_kind(fn, calls: int, device: torch.device, rows: int) -> dict:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        fn(), fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_time_total > 0 and e.device_type.name == "CUDA"]
        key = lambda e: e.self_device_time_total  # noqa: E731
    else:
        kernels = list(events)
        key = lambda e: e.self_cpu_time_total  # noqa: E731
    kernels.sort(key=lambda e: -key(e))
    by_class: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_class[kernel_class(e.key) if device.type == "cuda" else "cpu"] += key(e) / calls / 1000.0
    return {
        "kernel_ms_per_call": sum(key(e) for e in kernels) / calls / 1000.0,
        "kernels_per_call": sum(e.count for e in kernels) / calls,
        "by_class_ms": dict(by_class),
        "top": [{"ms": key(e) / calls / 1000.0, "calls": e.count / calls, "name": e.key[:160]}
                for e in kernels[:rows]],
    }


def graph_replay(fn):
    """``fn`` captured once into a CUDA graph; returns its replay (warm-up on a side stream first)."""
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd3-medium")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3, help="calls per profiled kind")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median per call)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--fixed", action="store_true", help="also a partial step of 2 image tokens")
    parser.add_argument("--graphs", action="store_true", help="CUDA: also time CUDA-graph replays")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    case = scale_models.build_model(args.family, args.resolution, batch=args.batch, layers=args.layers, width=args.width,
                             text_tokens=args.text_tokens, dtype=dtype, device=device)
    gm, inputs = capture_graph(case.model, case.inputs)
    patches = {"cpp.enable_kernel_profile": True} if device.type == "cpu" else {}
    plain = scale_groups.compile_plain(gm, inputs, patches)
    group = scale_groups.specdiff_group(gm, inputs, "inductor", args.ratio, with_full=True, draft=False,
                                 cfg_extra={"inductor_config": patches})
    fns = {"plain": lambda: plain(*inputs), **group.kinds}
    if args.fixed:
        tokens = case.image_tokens
        fixed = scale_groups.specdiff_group(gm, inputs, "inductor", 1.0 - 2.0 / tokens, with_full=False, draft=False,
                                     cfg_extra={"inductor_config": patches})
        fns.update({"specdiff_partial_2_tokens": f for f in fixed.kinds.values()})
    times = timing.time_round_robin(fns, repeats=args.repeats, calls=3 if device.type == "cuda" else 1,
                                   warmup=2, device=device)
    plain_ms = statistics.median(times["plain"])
    result = {"model": case.describe(), "batch": args.batch, "dtype": args.dtype, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": args.threads, "ratio": args.ratio, "kinds": {}}
    for name, fn in fns.items():
        ms = statistics.median(times[name])
        prof = profile_kind(fn, args.calls, device, args.rows)
        result["kinds"][name] = {"wall_ms": ms, "share": ms / plain_ms, "times_ms": times[name], **prof}
        print(f"\n===== {name}: {ms:.2f} ms per call (share {ms / plain_ms:.3f}); "
              f"{prof['kernel_ms_per_call']:.2f} ms of kernel time, {prof['kernels_per_call']:.0f} kernels per call")
        print("  by class: " + ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(prof["by_class_ms"].items())))
        print(f"{'ms/call':>9} {'calls':>6}  kernel or op")
        for row in prof["top"]:
            print(f"{row['ms']:9.3f} {row['calls']:6.0f}  {row['name'][:120]}")
        if args.json:  # after every kind: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    if args.graphs and device.type == "cuda":
        replays, result["graph_replay"] = {}, {}
        for name, fn in fns.items():
            try:
                replays[name] = graph_replay(fn)
            except Exception as exc:  # a kind that cannot be captured is a result, not a crash
                result["graph_replay"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        times = timing.time_round_robin(replays, repeats=args.repeats, calls=3, warmup=2, device=device)
        plain_replay = statistics.median(times["plain"]) if "plain" in times else float("nan")
        print("\n===== replayed from CUDA graphs")
        for name in replays:
            ms = statistics.median(times[name])
            result["graph_replay"][name] = {"ms": ms, "share": ms / plain_replay, "times_ms": times[name]}
            print(f"  {name:28s} {ms:8.2f} ms  share {ms / plain_replay:.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
