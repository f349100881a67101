"""``specdiff-fx scale``: what each step kind costs at real model sizes, against plain Inductor.

Why this exists: our quality numbers come from a 256-token reference model, where host work
and the model's fixed parts (embeddings, output layer) hide what token caching costs.  Users
run SD3/FLUX/PixArt at 1024² (4096 image tokens).  This command builds random-weight diffusers
transformers with the published architecture shapes (weights do not matter for speed), traces
the model once with dynamo, builds the runtimes of our policies from that one graph, and times
each compiled *variant* directly (``runtime.variants[kind]`` with the runtime's own buffers).
Calling the variants directly isolates what the graph rewrite costs; the runtime's Python
around them is reported separately (``stats()['host_ms_per_call']``).

Method (the house rule for speed): plain Inductor on the same graph in the same process,
threads pinned, warm-up calls excluded, per-call median over ``--repeats`` rounds.  Kinds are
timed round-robin in each round, and each group of kinds is timed together with the plain
step again, so load drift on shared CPUs hits the numerator and denominator alike.

Reduced CPU sizes (``--layers/--width/--text-tokens``) keep the family's block structure and
head size; ``--resolution 512`` gives 1024 image tokens for all three families (VAE factor 8,
patch 2 or FLUX's 2×2 packing).  For FLUX, ``--layers L`` means L double-stream and 2L
single-stream blocks (the real model's 19 + 38 ratio).

Policy ``taylor`` (the default policy) is timed in both forecasting modes: ``lite`` (one
residual per chain of blocks, so a forecast step skips whole blocks) and ``branch``
(``lite=False``: one forecast per residual branch; the gates and adaLN still run).  Its kinds are
``taylor_<mode>_record`` (the full step that also updates the Taylor terms) and
``taylor_<mode>_forecast`` (the cached step).

The command is this module; its parts have files of their own: the models
(bench/scale_models.py), the variants timed per policy (bench/scale_groups.py), the timing
(bench/timing.py) and the cost model (bench/scale_costs.py).  The graph is captured as
``specdiff-fx inspect`` captures it (inspect/capture.py).

The 28-step end-to-end speed-up is computed from the per-kind medians and each policy's
default schedule (``SpecDiffConfig``): fora = full steps + reuse steps, specdiff = full+record
steps + partial steps + draft calls; taylor = F record steps + (N − F) forecast steps for its
default schedule and the schedules in ``TAYLOR_SCHEDULES`` (:func:`forecast_speedup`).  It
excludes runtime host time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch

from ..inspect.capture import capture_graph
from .scale_costs import SCHEDULE_STEPS, TAYLOR_MODES, schedule_costs
from .scale_groups import Group, compile_plain, fora_group, specdiff_group, taylor_group
from .scale_models import FAMILIES, build_model, kv_cache_formula_bytes
from .timing import new_step, peak_memory_mb, time_round_robin

DEFAULT_RATIOS = (0.5, 0.8, 0.9)
POLICIES = ("specdiff", "fora", "taylor")


def run_scale(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    torch.set_num_threads(args.threads)
    if args.cudagraphs and (device.type != "cuda" or args.compiler != "inductor"):
        raise ValueError("--cudagraphs needs --device cuda and the inductor compiler")
    case = build_model(args.family, args.resolution, batch=args.batch, layers=args.layers, width=args.width,
                       head_dim=args.head_dim, text_tokens=args.text_tokens, dtype=dtype, device=device)
    ratios = list(args.ratios)
    result: dict = {
        "command": getattr(args, "command_line", None),
        "model": case.describe(), "batch": args.batch, "resolution": args.resolution, "dtype": args.dtype,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({os.cpu_count()} cores)", "threads": args.threads, "torch": torch.__version__,
        "compiler": args.compiler, "repeats": args.repeats, "calls": args.calls, "warmup": args.warmup,
        "kinds": {}, "groups": {}, "errors": {},
        "kv_cache_formula_mb": kv_cache_formula_bytes(case, args.batch, torch.empty((), dtype=dtype).element_size()) / 2**20,
    }
    log(f"scale: {case.describe()} batch {args.batch} {args.dtype} on {result['device_name']}")
    start = time.perf_counter()
    torch._dynamo.reset()
    gm, inputs = capture_graph(case.model, case.inputs)
    log(f"  traced in {time.perf_counter() - start:.1f}s ({len(inputs)} graph inputs)")
    patches = dict(args.inductor_config or {})
    # CUDA graphs: plain gets Inductor's own (cudagraph trees); our variants get
    # SpecDiffConfig(cudagraphs=True), one capture per cache slot (runtime/cuda_graphs.py)
    plain_patches = dict(patches, **{"triton.cudagraphs": True}) if args.cudagraphs else patches
    result["cudagraphs"] = bool(args.cudagraphs)
    cfg_extra = dict(inductor_config=patches, cudagraphs=bool(args.cudagraphs))

    start = time.perf_counter()
    plain = gm if args.compiler == "eager" else compile_plain(gm, inputs, plain_patches)
    result["compile_s"] = {"plain": time.perf_counter() - start}
    plain_fn = lambda: plain(*inputs)  # noqa: E731

    policies = [p for p in args.policies if not (p == "fora" and args.no_fora)]
    result["policies"], result["taylor_modes"] = policies, list(args.taylor_modes)
    builders: list[tuple[str, Callable[[], Group]]] = []
    first = ratios[0] if 0.8 not in ratios else 0.8
    if "specdiff" in policies:
        builders.append((f"specdiff cr {first:g}", lambda: specdiff_group(
            gm, inputs, args.compiler, first, with_full=True, draft=not args.no_draft, cfg_extra=cfg_extra)))
    if "fora" in policies:
        builders.append(("fora", lambda: fora_group(gm, inputs, args.compiler, cfg_extra)))
    if "taylor" in policies:
        for mode in args.taylor_modes:
            builders.append((f"taylor {mode}", lambda mode=mode: taylor_group(
                gm, inputs, args.compiler, mode == "lite", cfg_extra)))
    for ratio in ratios if "specdiff" in policies else ():
        if ratio != first:
            builders.append((f"specdiff cr {ratio:g}", lambda ratio=ratio: specdiff_group(
                gm, inputs, args.compiler, ratio, with_full=False, draft=False, cfg_extra=cfg_extra)))

    shares: dict[str, float] = {}
    paired_shares: dict[str, float] = {}
    for name, build in builders:
        start = time.perf_counter()
        try:
            group = build()
        except Exception as exc:  # a family we cannot rewrite is a result too, not a crash
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"  {name}: FAILED {result['errors'][name]}")
            continue
        result["compile_s"][name] = time.perf_counter() - start
        fns = {"plain": plain_fn, **group.kinds}
        if args.cudagraphs:  # each call is a new cudagraph-tree step (outputs are not kept)
            fns = {k: new_step(fn) for k, fn in fns.items()}
        times = time_round_robin(fns, repeats=args.repeats, calls=args.calls, warmup=args.warmup, device=device)
        plain_ms = statistics.median(times["plain"])
        result["groups"][name] = {"plain_ms": plain_ms, **group.info}
        for kind, fn in group.kinds.items():
            ms = statistics.median(times[kind])
            shares[kind] = ms / plain_ms
            # per-round ratio (same round, adjacent in time): robust to load drift on shared machines
            paired = statistics.median(t / p for t, p in zip(times[kind], times["plain"]))
            paired_shares[kind] = paired
            row = {"ms": ms, "share": ms / plain_ms, "share_paired": paired, "ideal_share": group.ideal[kind],
                   "plain_ms": plain_ms,
                   "times_ms": times[kind], "plain_times_ms": times["plain"], "group": name}
            if not args.no_memory:
                row["peak_mem_mb"] = peak_memory_mb(fn, device, group.held_bytes + _param_bytes(case.model))
            if kind.startswith("specdiff_partial") and "subset_tokens" in group.info:
                # joint attention computes every text token too: the share of tokens computed
                text = 0 if case.family == "pixart-sigma" else case.text_tokens
                row["token_share"] = (group.info["subset_tokens"] + text) / (case.image_tokens + text)
            result["kinds"][kind] = row
            log(f"  {kind:28s} {ms:9.2f} ms  share {ms / plain_ms:5.3f} (paired {paired:5.3f})  (ideal {group.ideal[kind]:.2f}, "
                f"plain {plain_ms:.2f} ms)")
        result["kinds"].setdefault("plain", {"ms": plain_ms, "share": 1.0, "share_paired": 1.0, "ideal_share": 1.0,
                                             "times_ms": times["plain"]})
        if not args.no_memory and "peak_mem_mb" not in result["kinds"]["plain"]:
            result["kinds"]["plain"]["peak_mem_mb"] = peak_memory_mb(plain_fn, device, _param_bytes(case.model))
        del group, fns
        result["schedule"] = schedule_costs(shares, ratios)
        result["schedule_paired"] = schedule_costs(paired_shares, ratios)
        if args.out:
            _write(result, args.out)
    result["schedule"] = schedule_costs(shares, ratios)
    result["schedule_paired"] = schedule_costs(paired_shares, ratios)
    for name, row in result["schedule"].items():
        paired = result["schedule_paired"][name]["speedup"]
        log(f"  28-step {name:28s} {row['full_steps']:2d} full: speed-up {row['speedup']:.2f}x "
            f"(paired {paired:.2f}x, ideal {row['ideal_speedup']:.2f}x)")
    if args.out:
        _write(result, args.out)
    if args.plot:
        scale_plot(result, args.plot)
    return result


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def scale_plot(result: dict, path: str) -> None:
    """Bars: measured share of a plain step per kind, with the compute-share (ideal) line."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    kinds = sorted(result["kinds"], key=lambda k: (k != "plain", k))
    # the paired share (same-round ratio) where the run has it: robust to load drift
    measured = [result["kinds"][k].get("share_paired", result["kinds"][k]["share"]) for k in kinds]
    ideal = [result["kinds"][k]["ideal_share"] for k in kinds]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1.4]})
    xs = range(len(kinds))
    ax.bar(xs, measured, color="tab:red", alpha=0.8, label="measured")
    ax.scatter(xs, ideal, color="black", marker="_", s=400, zorder=3, label="compute share (ideal)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [k.replace("specdiff_", "sd_") for k in kinds], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("time / plain Inductor step")
    ax.legend(fontsize=8)
    m = result["model"]
    ax.set_title(f"{m['family']} {m['layers']}L x {m['width']}, {m['image_tokens']}+{m['text_tokens']} tokens, "
                 f"batch {result['batch']}, {result['dtype']}, {result['device_name']}", fontsize=9)
    sched = result.get("schedule", {})
    names = list(sched)
    ax2.barh(range(len(names)), [sched[n]["speedup"] for n in names], color="tab:red", alpha=0.8, label="measured")
    ax2.scatter([sched[n]["ideal_speedup"] for n in names], range(len(names)), color="black", marker="|", s=300,
                zorder=3, label="ideal")
    ax2.set_yticks(range(len(names)), names, fontsize=8)
    ax2.set_xlabel(f"{SCHEDULE_STEPS}-step speed-up")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(result: dict) -> str:
    lines = ["| step kind | ms | share of plain | share, paired rounds | compute share (image tokens) | "
             "token share (with text) | peak MiB |", "|---|---|---|---|---|---|---|"]
    for kind, row in result["kinds"].items():
        mem, tokens = row.get("peak_mem_mb"), row.get("token_share")
        paired = row.get("share_paired")
        lines.append(f"| {kind} | {row['ms']:.2f} | {row['share']:.3f} | "
                     f"{'-' if paired is None else f'{paired:.3f}'} | {row['ideal_share']:.2f} | "
                     f"{'-' if tokens is None else f'{tokens:.3f}'} | {'-' if mem is None else f'{mem:.0f}'} |")
    paired_rows = result.get("schedule_paired", {})
    for name, row in result.get("schedule", {}).items():
        paired = paired_rows.get(name, {}).get("speedup")
        lines.append(f"| 28-step {name}, {row['full_steps']} full | | speed-up {row['speedup']:.2f}x | "
                     f"{'' if paired is None else f'speed-up {paired:.2f}x'} | ideal {row['ideal_speedup']:.2f}x | | |")
    return "\n".join(lines)


def _ratios(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return list(dict.fromkeys(names))
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="sd3-medium", choices=sorted(FAMILIES))
    parser.add_argument("--resolution", type=int, help="image side in pixels (default 1024; quick 128)")
    parser.add_argument("--layers", type=int, help="blocks (FLUX: double blocks; singles = 2x) (default: real)")
    parser.add_argument("--width", type=int, help="model width, a multiple of the head size (default: real)")
    parser.add_argument("--head-dim", type=int, help="head size (default: real)")
    parser.add_argument("--text-tokens", type=int, help="text tokens (default: the pipeline's)")
    parser.add_argument("--batch", type=int, default=2, help="denoiser batch (2 = one image with CFG)")
    parser.add_argument("--ratios", type=_ratios, default=list(DEFAULT_RATIOS), help="specdiff cache ratios")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compiler", choices=["inductor", "eager"], help="default inductor; quick eager")
    parser.add_argument("--threads", type=int, help="torch threads, pinned (default 2; quick 1)")
    parser.add_argument("--repeats", type=int, help="timed rounds; the median is reported (default 5; quick 1)")
    parser.add_argument("--calls", type=int, default=1, help="calls per timed round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per kind first")
    parser.add_argument("--no-draft", action="store_true", help="skip the draft variant")
    parser.add_argument("--no-fora", action="store_true", help="skip the fora variants")
    parser.add_argument("--policies", type=_choices(POLICIES), default=list(POLICIES),
                        help="policies whose step kinds are timed (default: specdiff,fora,taylor)")
    parser.add_argument("--taylor-modes", type=_choices(TAYLOR_MODES), default=list(TAYLOR_MODES),
                        help="taylor forecasting modes: lite (lite=True: one residual per chain of blocks), "
                             "branch (lite=False: every residual branch) (default: lite,branch)")
    parser.add_argument("--cudagraphs", action="store_true",
                        help="CUDA only: Inductor's CUDA graphs (triton.cudagraphs) for plain, "
                             "SpecDiffConfig(cudagraphs=True) for every variant")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke test: 128 px (64 tokens), 1 layer x 64, 8 text tokens, eager, "
                             "1 repeat, 1 thread; explicit options still win")
    parser.add_argument("--out", default="out/scale.json", help="JSON path")
    parser.add_argument("--plot", default="out/scale.png", help="plot path ('' for none)")
    parser.set_defaults(inductor_config=None)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        for name, value in (("resolution", 128), ("layers", 1), ("width", 64), ("text_tokens", 8)):
            if getattr(args, name) is None:
                setattr(args, name, value)
        for name, value in (("compiler", "eager"), ("repeats", 1), ("threads", 1)):
            if getattr(args, name) is None:
                setattr(args, name, value)
    for name, value in (("resolution", 1024), ("compiler", "inductor"), ("repeats", 5), ("threads", 2)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.width is not None and args.head_dim is None and args.width < FAMILIES[args.family]["head_dim"]:
        args.head_dim = args.width
    return args


def run(args: argparse.Namespace) -> int:
    import sys

    args.command_line = "specdiff-fx scale " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else None
    args = resolve(args)
    result = run_scale(args)
    print(format_table(result))
    return 1 if result["errors"] and not result["kinds"] else 0
