"""``specdiff-fx compile-time``: cold and warm compile seconds per policy against plain Inductor,
whole-model and regional, each measured in a fresh process.

Why: a served model pays its compile at every restart, scale-out and redeploy (the cold start),
and a warm Inductor cache only helps where the cache directory survives.  A caching policy
compiles more than plain Inductor does -- one graph per step variant (full, record, forecast,
partial) where plain compiles one -- so a whole-model compile multiplies with the variants;
regional compilation compiles one graph per repeated block class instead of the whole stack,
which is what diffusers recommends against cold starts.  This command puts numbers on both.

How: every measurement is a child process of its own (``python -m
specdiff_fx.bench.compile_time --child MODE,METHOD ...``), threads pinned, with
``TORCHINDUCTOR_CACHE_DIR`` set to a directory of its own for each (mode, method):

- **cold**: the directory is new and empty (nothing compiled before, in memory or on disk);
- **warm**: a second child right after, with the directory the cold child filled (Inductor's FX
  graph and AOTAutograd caches hit; dynamo still traces, which no on-disk cache skips).

In a child: the reference model is loaded, the denoiser built (plain ``torch.compile`` or our
backend, whole model or each repeated block), then ``--repeats + 1`` CFG sampling calls of one
trajectory each (``--steps`` steps, ``--batch-size`` images, ``sample(batch_cfg=True)`` as the
bench runs them) are timed.  **Compile seconds** = the first call's seconds minus the median of
the later calls' (the steady seconds per trajectory); everything a policy compiles lazily during
its first trajectory (a variant first needed at step 5) is in the first call.  Model loading and
imports are not counted.  The child reports Inductor's FX graph cache hits / misses / bypasses and
AOTAutograd's (``torch._dynamo.utils.counters``) with its times as one JSON line; the table's
steady seconds are the warm child's.

Methods: ``plain`` (Inductor as it is), and our policies ``off`` (the backend's passes, no
caching), ``fora``, ``taylor`` (the default policy) and ``specdiff`` (token level; regional
compiles it without caching, with a warning, which the row notes), each with its defaults.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

METHODS = ("plain", "off", "fora", "taylor", "specdiff")
MODES = ("whole", "regional")
PHASES = ("cold", "warm")
RESULT_PREFIX = "COMPILE_TIME_RESULT "  # marks the child's result line on its stdout
# the default policy is taylor: its row builds the backend without naming a policy
POLICY_OVERRIDES = {"off": {"policy": "off"}, "fora": {"policy": "fora"}, "taylor": {},
                    "specdiff": {"policy": "specdiff"}}
CACHE_COUNTERS = (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                  ("inductor", "fxgraph_cache_bypass"), ("aot_autograd", "autograd_cache_hit"),
                  ("aot_autograd", "autograd_cache_miss"), ("aot_autograd", "autograd_cache_bypass"))
STDERR_TAIL = 2000  # characters of a failed child's stderr kept in its row


def _choices(text: str, known: tuple[str, ...], option: str) -> list[str]:
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in known]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"{option}: unknown {unknown or text!r}; known: {', '.join(known)}")
    return wanted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=28, help="sampling steps per trajectory (default 28)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per sample() call (default 2)")
    parser.add_argument("--guidance", type=float, help="CFG scale (default: reference.model.sample's default)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed calls after the first; their median is the steady time (default 2)")
    parser.add_argument("--layers", type=int,
                        help="the reference architecture with this many blocks and random weights instead of the "
                             "trained 4-block model (compile time depends on the graph, not the weights; real "
                             "models have 19-60 blocks, SD3-medium 24)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child, pinned (default 2)")
    parser.add_argument("--methods", type=lambda t: _choices(t, METHODS, "--methods"), default=list(METHODS),
                        help=f"comma-separated, of {','.join(METHODS)} (default all)")
    parser.add_argument("--modes", type=lambda t: _choices(t, MODES, "--modes"), default=list(MODES),
                        help="comma-separated, of whole,regional (default both)")
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "eager"),
                        help="inductor (default); eager only exercises the plumbing quickly (no compile to time)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds a child may run before its row is an error (default 1800)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the machine as JSON")
    # a child's measurement (run by the parent, not by hand)
    parser.add_argument("--child", metavar="MODE,METHOD", help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------- child
def _counters() -> dict:
    from torch._dynamo.utils import counters

    return {name: int(counters[group][name]) for group, name in CACHE_COUNTERS if name in counters[group]}


def _build(model, mode: str, method: str, compiler: str):
    """(denoiser, begin_trajectory, end_step, config text, notes) of one (mode, method)."""
    import torch

    transformer = model.transformer
    notes = []
    if method == "plain":
        if mode == "whole":
            compiled = torch.compile(transformer, backend=compiler, fullgraph=True, dynamic=False)
            return compiled, None, None, f"torch.compile({compiler}), fullgraph, dynamic=False", notes
        from ..regional import repeated_blocks

        blocks = repeated_blocks(transformer)
        for block in blocks:
            block.compile(backend=compiler, fullgraph=True, dynamic=False)
        return transformer, None, None, f"{len(blocks)} blocks .compile({compiler}), fullgraph, dynamic=False", notes

    overrides = dict(POLICY_OVERRIDES[method], compiler=compiler)
    if mode == "whole":
        from .. import make_backend

        backend = make_backend(**overrides)
        compiled = torch.compile(transformer, backend=backend, fullgraph=True, dynamic=False)
        return compiled, None, None, f"make_backend({_kwargs_text(overrides)}), fullgraph", notes
    from .. import compile_regional

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = compile_regional(transformer, fullgraph=True, **overrides)
    notes += [str(w.message) for w in caught]
    config = (f"compile_regional({_kwargs_text(overrides)}), fullgraph, {len(rc.blocks)} blocks; "
              f"policy run: {rc.backend.config.policy}")
    return transformer, rc.begin_trajectory, rc.end_step, config, notes


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _full_steps(denoiser, trajectories: int) -> float | None:
    """Full steps per trajectory our runtime counted (None: plain, or not countable)."""
    try:
        from .. import get_runtime

        stats = get_runtime(denoiser).stats()
    except Exception:  # plain compile, or a runtime without this stat
        return None
    return stats["full_steps"] / trajectories if "full_steps" in stats and trajectories else None


def measure(args: argparse.Namespace, mode: str, method: str) -> dict:
    """One measurement in this process (which should be fresh): build, then time ``repeats + 1``
    trajectories; the first one's extra seconds are the compile seconds."""
    import torch

    from ..demo import load_demo_model
    from ..reference.model import sample
    from .methods import make_groups

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.layers:
        from ..reference.model import ClassConditionalMMDiT

        torch.manual_seed(0)
        model = ClassConditionalMMDiT(transformer_config={"num_layers": args.layers})
        description = f"reference architecture with {args.layers} blocks, random weights"
    else:
        model, description = load_demo_model()
    model = model.eval()
    cfg = model.transformer.config
    labels, noise = make_groups(args.batch_size, args.batch_size, model.num_classes,
                                (cfg.in_channels, cfg.sample_size, cfg.sample_size))[0]
    load_s = time.perf_counter() - t0
    denoiser, begin, end_step, config, notes = _build(model, mode, method, args.compiler)
    callback = (lambda i, t, x: end_step()) if end_step is not None else None

    def trajectory() -> float:
        t0 = time.perf_counter()
        if begin is not None:
            begin()
        sample(model, labels, num_steps=args.steps, guidance_scale=args.guidance, transformer=denoiser,
               batch_cfg=True, device="cpu", noise=noise, callback=callback)
        return time.perf_counter() - t0

    first = trajectory()
    cache = _counters()  # after the first call: what compiling hit and missed
    times = [trajectory() for _ in range(args.repeats)]
    steady = statistics.median(times)
    return dict(mode=mode, method=method, status="ok", config=config, model=description,
                first_s=first, times_s=times, steady_s=steady, compile_s=max(0.0, first - steady),
                load_s=load_s, cache=cache, full_steps=_full_steps(denoiser, args.repeats + 1),
                notes=notes)


def child_main(args: argparse.Namespace) -> int:
    mode, _, method = args.child.partition(",")
    try:
        result = measure(args, mode, method)
        code = 0
    except Exception as exc:  # the parent turns it into an error row
        traceback.print_exc(file=sys.stderr)
        result = dict(mode=mode, method=method, status="error", reason=f"{type(exc).__name__}: {exc}")
        code = 1
    sys.stdout.write(RESULT_PREFIX + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
    return code


# ----------------------------------------------------------------------------- parent
def _child_command(args: argparse.Namespace, mode: str, method: str) -> list[str]:
    return [sys.executable, "-m", "specdiff_fx.bench.compile_time", "--child", f"{mode},{method}",
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--guidance", repr(args.guidance),
            "--repeats", str(args.repeats), "--threads", str(args.threads), "--compiler", args.compiler] + \
        (["--layers", str(args.layers)] if args.layers else [])


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def run_child(args: argparse.Namespace, mode: str, method: str, cache_dir: str) -> dict:
    """One child process with ``TORCHINDUCTOR_CACHE_DIR=cache_dir``; its result (or an error)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONPATH=path)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(_child_command(args, mode, method), env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired as exc:
        return dict(mode=mode, method=method, status="error",
                    reason=f"child ran past --timeout {args.timeout:g} s", stderr=_tail(exc.stderr))
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        return dict(mode=mode, method=method, status="error", reason=f"child exited {proc.returncode} without "
                    "a result", stderr=_tail(proc.stderr), process_s=wall)
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["process_s"] = wall
    if result.get("status") != "ok":
        result["stderr"] = _tail(proc.stderr)
    return result


def _tail(text) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-STDERR_TAIL:]


def measure_pair(args: argparse.Namespace, mode: str, method: str) -> dict:
    """The cold child in a new, empty cache directory, then the warm child in the same one."""
    cache_dir = tempfile.mkdtemp(prefix=f"specdiff-compile-time-{mode}-{method}-")
    try:
        cold = run_child(args, mode, method, cache_dir)
        cache_mb = _dir_bytes(cache_dir) / 2**20
        warm = run_child(args, mode, method, cache_dir)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return dict(mode=mode, method=method, cold=cold, warm=warm, cache_mb=cache_mb)


def _ok(result: dict) -> bool:
    return result.get("status") == "ok"


def _ratio_base(rows: list[dict]) -> float | None:
    for row in rows:
        if row["mode"] == "whole" and row["method"] == "plain" and _ok(row["cold"]):
            return row["cold"]["compile_s"]
    return None


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _cache_text(result: dict) -> str:
    if not _ok(result):
        return "-"
    c = result.get("cache", {})
    if not any(k.startswith("fxgraph") for k in c):
        return "-"
    text = f"{c.get('fxgraph_cache_hit', 0)}/{c.get('fxgraph_cache_hit', 0) + c.get('fxgraph_cache_miss', 0)}"
    if c.get("fxgraph_cache_bypass"):
        text += f" ({c['fxgraph_cache_bypass']} bypassed)"
    return text


def format_table(rows: list[dict]) -> str:
    from tabulate import tabulate

    base = _ratio_base(rows)
    table = []
    for row in rows:
        cold, warm = row["cold"], row["warm"]
        cold_s = cold.get("compile_s") if _ok(cold) else None
        ratio = cold_s / base if cold_s is not None and base else None
        table.append([
            row["mode"], row["method"],
            _fmt(cold_s, ".1f") if _ok(cold) else f"ERROR: {cold.get('reason')}",
            _fmt(warm.get("compile_s"), ".1f") if _ok(warm) else f"ERROR: {warm.get('reason')}",
            _fmt(ratio, ".2f") + ("x" if ratio is not None else ""),
            _fmt(warm.get("steady_s") if _ok(warm) else cold.get("steady_s"), ".2f"),
            _cache_text(warm),
        ])
    headers = ["mode", "method", "cold compile s", "warm compile s", "cold / plain whole cold",
               "steady s / trajectory", "FX cache hits warm"]
    return tabulate(table, headers=headers, disable_numparse=True, maxcolwidths=[None, None, 40, 40, None, None, None])


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _default_guidance() -> float:
    from ..reference.model import sample

    return float(inspect.signature(sample).parameters["guidance_scale"].default)


def report(args: argparse.Namespace, rows: list[dict], commit: str | None) -> dict:
    import torch

    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        torch=torch.__version__,
        machine=dict(processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                     platform=platform.platform()),
        git_commit=commit,  # read when the run started: the code the children ran
        workload=dict(steps=args.steps, batch_size=args.batch_size, guidance=args.guidance, repeats=args.repeats,
                      layers=args.layers,
                      threads=args.threads, compiler=args.compiler),
        definition="compile_s = first sample() call - median of the --repeats later calls, each call one "
                   "trajectory; cold: new empty TORCHINDUCTOR_CACHE_DIR; warm: the next process on it",
        plain_whole_cold_compile_s=_ratio_base(rows),
        rows=rows,
    )


def _write(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, allow_nan=False, default=str)
        f.write("\n")


def _note_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        for phase in PHASES:
            result = row[phase]
            if not _ok(result):
                lines.append(f"{row['mode']} {row['method']} {phase}: {result.get('reason')}")
                if result.get("stderr"):
                    lines.append("  " + result["stderr"].strip().splitlines()[-1][:300])
        notes = row["cold"].get("notes") or []
        lines += [f"{row['mode']} {row['method']}: {n.splitlines()[0][:300]}" for n in dict.fromkeys(notes)]
    return lines


def run(args: argparse.Namespace) -> int:
    if args.guidance is None:
        args.guidance = _default_guidance()
    if args.child:
        return child_main(args)
    for key in ("steps", "batch_size", "repeats", "threads"):
        if getattr(args, key) < 1:
            print(f"specdiff-fx compile-time: --{key.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    print(f"compile time: {f'{args.layers} blocks (random weights), ' if args.layers else ''}{args.steps} steps, batch {args.batch_size}, CFG {args.guidance:g} (batched), "
          f"{args.repeats} repeat(s) after the first call, {args.threads} thread(s), compiler {args.compiler}; "
          "one process per measurement", flush=True)
    rows, commit = [], _git_commit()
    for mode in args.modes:
        for method in args.methods:
            print(f"  {mode} {method}: cold, then warm ...", flush=True)
            row = measure_pair(args, mode, method)
            rows.append(row)
            print("    " + ", ".join(
                f"{phase} {row[phase]['compile_s']:.1f} s" if _ok(row[phase]) else f"{phase} ERROR"
                for phase in PHASES), flush=True)
            if args.json:  # a long run keeps what it measured so far
                _write(args.json, report(args, rows, commit))
    print()
    print(format_table(rows))
    notes = _note_lines(rows)
    if notes:
        print("\nnotes:")
        print("\n".join(f"- {n}" for n in notes))
    if args.json:
        _write(args.json, report(args, rows, commit))
        print(f"\nwritten to {args.json}")
    return 0 if all(_ok(r[p]) for r in rows for p in PHASES) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdiff-fx compile-time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
