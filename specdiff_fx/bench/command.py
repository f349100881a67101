"""``specdiff-fx bench``: caching policies vs plain Inductor and third-party caches, on the reference model.

Workload: CFG sampling (``reference.model.sample``, ``batch_cfg=True``: one denoiser call per step)
of the trained reference MMDiT, one image per seed (seeds 0..N-1, labels cycling through the
classes).  Every row runs the same workload; the uncached baseline runs first, in the same process.

- speed-up: baseline seconds / method seconds for the whole workload, each the median of
  ``--repeats``, warm-up (the first sample call, which compiles) excluded, threads pinned
  (``--threads``).  Each row's baseline seconds are its own: a second, plain-compiled copy of the
  model runs the same workload alternately with the row's timed runs (see :meth:`Bench.paired`),
  so a shared machine that drifts 10-20 % in speed over a long run moves both sides of a ratio
  alike instead of favouring the rows timed while it was fast;
- PSNR (dB) and SSIM against the baseline images of the same seeds;
- class accuracy (reference classifier) and FD (Frechet distance of classifier features) against
  real images from ``reference.data``;
- peak memory (see ``metrics.peak_memory_mb``), compile seconds (the first sample call minus the
  same call warm),
  dynamo recompilations (``metrics.CompileCounter``);
- with ``--across-guidance`` / ``--across-batch-size``: each row's PSNR on requests it was not
  set up (or tuned) for, against the baseline on the same requests: the same seeds at other CFG
  scales, and sampled at another batch size.  A config tuned at one CFG and batch can lose its
  quality elsewhere; these columns say how far it travels.  They are measured after the timed
  runs, so they never enter the speed-up.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import math
import statistics
import sys
import time
import traceback
from typing import Callable

import torch

from ..device_sync import synchronize as _sync
from ..quality import psnr
from .methods import COMPILERS, Method, Prepared, SkipMethod, StepCounts, Workload, make_groups

ROW_KEYS = ("method", "label", "family", "status", "reason", "config", "speedup", "time_s", "times_s",
            "baseline_time_s", "baseline_times_s", "ms_per_image",
            "psnr", "ssim", "accuracy", "fd", "peak_mem_mb", "compile_s", "recompiles", "graphs",
            "steps", "full_steps", "partial_steps", "identical_to_baseline", "across", "info", "workload")
CALIBRATION_SEED_OFFSET = 10_000
REAL_DATA_SEED = 777


def _default_guidance() -> float:
    from ..reference.model import sample

    return float(inspect.signature(sample).parameters["guidance_scale"].default)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _pairs(text: str) -> list[tuple[float, int]]:
    pairs = []
    for item in text.split(","):
        if item.strip():
            ratio, _, every = item.partition(":")
            pairs.append((float(ratio), int(every or 1)))
    return pairs


def _schedules(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(x) for x in item.split("-")) for item in text.split(",") if item.strip()]


def _forecast_schedules(text: str) -> list[tuple[float, int, tuple[int, ...]]]:
    rows = []
    for item in (t for t in text.split(",") if t.strip()):
        ratio, every, steps = item.split(":")
        rows.append((float(ratio), int(every), tuple(int(s) for s in steps.split("-"))))
    return rows


def _threshold(text: str):
    return text if text == "auto" else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--quick", action="store_true",
                   help="CI smoke test: 2 seeds, 6 steps, 1 repeat, 1 thread, no torch.compile for the baseline and "
                        "anchors (our policies: eager compiler); explicit options still win")
    g.add_argument("--steps", type=int, help="sampling steps (default 28; quick 6)")
    g.add_argument("--seeds", type=int, help="images, one per seed 0..N-1, labels cycling (default 8; quick 2)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="images per sample() call (default 1; must divide --seeds)")
    g.add_argument("--guidance", type=float, help="CFG scale (default: reference.model.sample's default)")
    g.add_argument("--across-guidance", type=_floats, default=[], metavar="LIST",
                   help="also each row's PSNR with the same seeds at these CFG scales (e.g. 1.5,3,5), against the "
                        "baseline at each: how far a config travels (not timed)")
    g.add_argument("--across-batch-size", type=int, metavar="N",
                   help="also each row's PSNR with the same seeds sampled N images per call (e.g. 1; with "
                        "torch.compile a new input shape, so each row compiles once more; not timed)")
    g.add_argument("--repeats", type=int, help="timed repeats of the workload, median reported (default 3; quick 1)")
    g.add_argument("--threads", type=int,
                   help="torch threads, pinned (default 2; quick 1: on shared cores 2 threads can stall badly)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    g.add_argument("--compiler", choices=COMPILERS,
                   help="inductor (default), eager (torch.compile backend=eager), or none (baseline and anchors "
                        "uncompiled; our policies always go through torch.compile, with the eager compiler); "
                        "quick default: none")
    g.add_argument("--real-images", type=int, help="real images for FD features (default 1200; quick 240)")
    g.add_argument("--calibration-seeds", type=int,
                   help=f"seeds (from {CALIBRATION_SEED_OFFSET}, never evaluated) used to tune anchors "
                        "(default 2; quick 1)")
    m = parser.add_argument_group("methods")
    m.add_argument("--methods", help="comma- (or, for labels holding commas, semicolon-) separated method names or "
                                     "row labels to run (baseline always runs); default: all")
    m.add_argument("--cache-ratios", type=_floats, default=[0.5, 0.7, 0.8],
                   help="specdiff cache ratios (default 0.5,0.7,0.8; 0.7 is the library default)")
    m.add_argument("--fora-intervals", type=_ints, default=[2, 3], help="fora intervals (default 2,3)")
    m.add_argument("--taylor-intervals", type=_ints, default=[2, 3, 4, 5],
                   help="taylor (order 1, every branch) intervals (default 2,3,4,5)")
    m.add_argument("--taylor2-intervals", type=_ints, default=[4],
                   help="taylor order-2 intervals (default 4)")
    m.add_argument("--lite-intervals", type=_ints, default=[4, 5, 6, 7],
                   help="taylor lite (one residual per stream) intervals (default 4,5,6,7)")
    m.add_argument("--lite-schedules", type=_schedules, default=[(5, 10, 15, 20), (5, 9, 14, 20)],
                   help="taylor lite rows with explicit full steps after the warm-up (0-2), as dash-separated "
                        "steps, comma-separated rows (default 5-10-15-20,5-9-14-20)")
    m.add_argument("--forecaster-schedules", type=_schedules, default=[(6, 13, 20), (5, 9, 14, 20)],
                   help="taylor lite rows per forecaster (hermite, fitted) with explicit full steps after the warm-up "
                        "(0-2), as dash-separated steps, comma-separated rows (default 6-13-20,5-9-14-20); "
                        "the first also with the taylor forecaster")
    m.add_argument("--config", action="append", default=[], metavar="'policy=NAME KEY=VALUE ...'",
                   help="a row of any registered policy (specdiff_fx.policies) with these SpecDiffConfig fields, "
                        "values as Python literals, e.g. 'policy=sandwich front_blocks=1 interval=0 "
                        "reset_steps=(6,13,20)' (repeatable)")
    m.add_argument("--tuned", action="append", default=[], metavar="PATH",
                   help="a row from a config `specdiff-fx tune` saved (repeatable)")
    m.add_argument("--regional", action="store_true",
                   help="also rows with regional compilation (each block class compiled on its own, "
                        "specdiff_fx.compile_regional): policy off (what not fusing across blocks costs), fora "
                        "interval 3, taylor lite interval 5, and each --tuned config")
    m.add_argument("--specdiff-forecast-schedules", type=_forecast_schedules, default=[(0.9, 3, (5, 9, 14, 20))],
                   help="token-level SpecDiff with forecasting on explicit full steps after the warm-up (0-2), as "
                        "cache_ratio:partial_every:dash-separated steps, comma-separated rows (default 0.9:3:5-9-14-20); each "
                        "with and without kv_forecast")
    m.add_argument("--lite-tolerances", type=_floats, default=[0.3],
                   help="verified taylor lite rows: the first-block probe checks every forecast step and refreshes "
                        "when its error passes this tolerance (interval = the largest --lite-intervals; the "
                        "threshold grows by --tolerance-growth per step; default 0.3)")
    m.add_argument("--tolerance-growth", type=float, default=0.0,
                   help="tolerance_growth of the --lite-tolerances rows (default 0)")
    m.add_argument("--taylor-tolerances", type=_floats, default=[],
                   help="taylor rows with a probe tolerance (interval = the largest --taylor-intervals)")
    m.add_argument("--specdiff-forecast", type=_pairs, default=[(0.7, 1), (0.5, 2)],
                   help="token-level SpecDiff with forecasting, as cache_ratio:partial_every pairs "
                        "(default 0.7:1,0.5:2)")
    m.add_argument("--taylorseer-intervals", type=_ints, default=[5],
                   help="extra diffusers-TaylorSeer rows (full and lite) at these intervals (default 5)")
    m.add_argument("--fast-skip-target", type=float, default=0.75,
                   help="extra cache-dit DBCache+TaylorSeer row tuned to skip this share of steps (default 0.75)")
    m.add_argument("--skip-target", type=float, default=0.5,
                   help="auto thresholds: smallest threshold that skips this share of calibration steps (default 0.5)")
    m.add_argument("--fbc-threshold", type=_threshold, default="auto", help="FirstBlockCache threshold or 'auto'")
    m.add_argument("--dbcache-threshold", type=_threshold, default="auto", help="DBCache residual threshold or 'auto'")
    m.add_argument("--magcache-threshold", type=float, default=0.06, help="MagCache threshold (default 0.06)")
    m.add_argument("--taylorseer-interval", type=int, default=3, help="TaylorSeer cache_interval (default 3)")
    o = parser.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    o.add_argument("--plot", metavar="PATH", help="write a Pareto plot (speed-up vs PSNR) as PNG")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    defaults = dict(steps=(6, 28), seeds=(2, 8), repeats=(1, 3), threads=(1, 2), compiler=("none", "inductor"),
                    real_images=(240, 1200), calibration_seeds=(1, 2))
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    if args.guidance is None:
        args.guidance = _default_guidance()
    for key in ("steps", "seeds", "repeats", "batch_size", "threads", "real_images"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1")
    if args.seeds % args.batch_size:
        # one input shape for every call: no recompiles, one runtime per compiled method
        raise ValueError(f"--seeds ({args.seeds}) must be a multiple of --batch-size ({args.batch_size})")
    if args.real_images < 2:
        raise ValueError("--real-images must be >= 2")
    if any(g <= 0 for g in args.across_guidance):
        raise ValueError("--across-guidance scales must be > 0")
    if args.across_batch_size is not None and (args.across_batch_size < 1 or args.seeds % args.across_batch_size):
        raise ValueError(f"--across-batch-size must be >= 1 and divide --seeds ({args.seeds})")
    return args


# ----------------------------------------------------------------------------- methods
def all_methods(args: argparse.Namespace) -> list[Method]:
    from .anchors import anchor_methods
    from .methods import (
        baseline_method, config_method, fora_method, specdiff_forecast_method, specdiff_method, taylor_method,
        tuned_method,
    )

    methods = [baseline_method()]
    methods += [specdiff_method(cr) for cr in args.cache_ratios]
    methods += [specdiff_forecast_method(cr, every) for cr, every in args.specdiff_forecast]
    methods += [specdiff_forecast_method(cr, every, steps, kv_forecast=kv)
                for cr, every, steps in args.specdiff_forecast_schedules for kv in (False, True)]
    methods += [fora_method(iv) for iv in args.fora_intervals]
    methods += [taylor_method(iv) for iv in args.taylor_intervals]
    methods += [taylor_method(iv, order=2) for iv in args.taylor2_intervals]
    methods += [taylor_method(iv, lite=True) for iv in args.lite_intervals]
    methods += [taylor_method(0, lite=True, reset_steps=steps) for steps in args.lite_schedules]
    for i, steps in enumerate(args.forecaster_schedules):
        if i == 0 and steps not in args.lite_schedules:
            methods.append(taylor_method(0, lite=True, reset_steps=steps))
        methods.append(taylor_method(0, lite=True, reset_steps=steps, forecaster="hermite",
                                     forecaster_options={"sigma": 0.7}))
        methods.append(taylor_method(0, lite=True, reset_steps=steps, forecaster="fitted"))
    methods += [tuned_method(path) for path in args.tuned]
    if args.regional:
        methods += [config_method("policy=off regional=True"),
                    config_method("policy=fora regional=True interval=3 warmup_steps=2"),
                    config_method("policy=taylor regional=True interval=5 warmup_steps=3")]
        methods += [tuned_method(path, regional=True) for path in args.tuned]
    methods += [config_method(text) for text in args.config]
    if args.taylor_intervals:
        methods += [taylor_method(max(args.taylor_intervals), tolerance=tol) for tol in args.taylor_tolerances]
    if args.lite_intervals:
        methods += [taylor_method(max(args.lite_intervals), lite=True, tolerance=tol,
                                  tolerance_growth=args.tolerance_growth) for tol in args.lite_tolerances]
    methods += anchor_methods(tuple(args.taylorseer_intervals), args.fast_skip_target)
    return methods


def select_methods(methods: list[Method], spec: str | None) -> list[Method]:
    if not spec:
        return methods
    sep = ";" if ";" in spec else ","  # labels such as "full=5,9,14,20" hold commas: separate those by ';'
    wanted = {w.strip() for w in spec.split(sep) if w.strip()}
    known = {m.name for m in methods} | {m.label for m in methods}
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown --methods {sorted(unknown)}; known: {sorted(known)}")
    return [m for m in methods if m.name == "baseline" or m.name in wanted or m.label in wanted]


def _own_backend(compiler: str) -> Callable:
    """The paired baseline's backend: the run's compiler (Inductor's ``compile_fx`` with default
    options, what ``backend="inductor"`` runs), as a backend object of its own.  Dynamo shares
    a frame's cache entries between compiles whose backends compare equal, so with the plain
    ``"inductor"`` the pair could run a forward a third-party cache compiled around its hooks
    (with graph breaks where they sat); its own backend makes it trace and compile its own."""
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        def inductor(gm, example_inputs):
            return compile_fx(gm, example_inputs)

        return inductor

    def eager(gm, example_inputs):
        return gm.forward

    return eager


def _empty_row(method: Method, status: str, reason: str | None, workload: dict) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update(method=method.name, label=method.label, family=method.family, status=status, reason=reason,
               config=reason if status != "ok" else None, identical_to_baseline=False, info={},
               workload=workload)
    return row


def _finite(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from ..demo import load_demo_model
        from ..reference.classifier import features, load_classifier
        from ..reference.data import make_dataset
        from .metrics import CompileCounter

        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available in this torch build / machine")
        model, self.model_description = load_demo_model()
        self.model = model.to(self.device).eval()
        cfg = self.model.transformer.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        groups = make_groups(args.seeds, args.batch_size, self.model.num_classes, shape)
        calibration = make_groups(args.calibration_seeds, args.batch_size, self.model.num_classes, shape,
                                  seed_offset=CALIBRATION_SEED_OFFSET)
        options = dict(skip_target=args.skip_target, fbc_threshold=args.fbc_threshold,
                       dbcache_threshold=args.dbcache_threshold, magcache_threshold=args.magcache_threshold,
                       taylorseer_interval=args.taylorseer_interval)
        self.workload = Workload(self.model, args.steps, args.guidance, self.device, args.compiler, groups,
                                 calibration, options)
        self.labels = torch.cat([g[0] for g in groups])
        self.warmup_groups = groups[:1]  # every group has the same shape (see _resolve)
        self.classifier = load_classifier()
        real, _ = make_dataset(args.real_images, seed=REAL_DATA_SEED)
        self.real_features = features(real, self.classifier)
        self.counter = CompileCounter()
        self.reference: torch.Tensor | None = None
        self.across = self._across_workloads(args, shape)
        self.across_reference: dict[str, torch.Tensor] = {}
        # the paired baseline's own copy: third-party caches hook or patch the model they are given
        self.pair_transformer = copy.deepcopy(self.model.transformer)
        self.workload_info = dict(steps=args.steps, seeds=args.seeds, batch_size=args.batch_size,
                                  guidance=args.guidance, repeats=args.repeats, threads=args.threads,
                                  device=str(self.device), compiler=args.compiler,
                                  model=self.model_description, torch=torch.__version__)

    def _across_workloads(self, args: argparse.Namespace, shape: tuple[int, ...]) -> dict[str, Workload]:
        """The other requests each row is scored on, by column name: the run's seeds at each
        ``--across-guidance`` scale, and at ``--across-batch-size`` images per call."""
        import dataclasses

        out = {f"CFG {g:g}": dataclasses.replace(self.workload, guidance_scale=g) for g in args.across_guidance}
        if args.across_batch_size is not None:
            groups = make_groups(args.seeds, args.across_batch_size, self.model.num_classes, shape)
            out[f"batch {args.across_batch_size}"] = dataclasses.replace(self.workload, groups=groups)
        return out

    def _quality_across(self, prepared: Prepared, phase, is_baseline: bool) -> dict[str, float | None]:
        """PSNR of the prepared method on each request of :attr:`across` against the baseline's
        images of the same request (the baseline row records those; its own entries are None,
        as are a row's on a request where its images equal the baseline's)."""
        out: dict[str, float | None] = {}
        for name, wl in self.across.items():
            phase(f"quality at {name}")
            images = []
            for group in wl.groups:
                with prepared.sample_context():
                    images.append(wl.run_group(prepared.denoiser, group, prepared.callback).cpu())
            images = torch.cat(images)
            if is_baseline:
                self.across_reference[name] = images
                out[name] = None
            else:
                out[name] = _finite(psnr(images, self.across_reference[name]))
        return out

    # ------------------------------------------------------------------ one row
    def run(self, method: Method, progress=None) -> dict:
        try:
            return self._run(method, progress)
        except SkipMethod as exc:
            return _empty_row(method, "skipped", str(exc), self.workload_info)
        except Exception as exc:  # one broken row must not lose the others
            traceback.print_exc(file=sys.stderr)
            return _empty_row(method, "error", f"{type(exc).__name__}: {exc}", self.workload_info)
        finally:
            gc.collect()
            torch._dynamo.reset()

    def _prepare(self, method: Method, phase) -> tuple[Prepared, Callable, float]:
        """Build (calibrating anchors), then the warm-up call that compiles.
        Returns (prepared, one-call function, seconds of the warm-up call)."""
        wl = self.workload
        phase("build/calibrate")
        self.counter.start()
        prepared: Prepared = method.build(wl)

        def one(group) -> torch.Tensor:
            with prepared.sample_context():
                images = wl.run_group(prepared.denoiser, group, prepared.callback)
            _sync(self.device)
            return images

        def warm_up() -> None:  # compiles (and recompiles) happen here
            for group in self.warmup_groups:
                one(group)

        phase("warm-up (compile)")
        t0 = time.perf_counter()
        try:
            warm_up()
        except Exception as exc:
            if prepared.uncompiled is None or prepared.uncompiled is prepared.denoiser:
                raise
            prepared.denoiser = prepared.uncompiled
            prepared.config += f"; torch.compile FAILED ({type(exc).__name__}: {str(exc)[:120]}), ran uncompiled"
            self.counter.start()
            t0 = time.perf_counter()
            warm_up()
        return prepared, one, time.perf_counter() - t0

    def _time(self, one: Callable, phase, progress, pair: Callable | None = None
              ) -> tuple[list[float], list[float], torch.Tensor]:
        """Timed repeats of the workload; with ``pair``, each repeat first times the paired
        baseline on the same workload.  Returns (times, pair times, images)."""
        times, pair_times, images = [], [], None
        for r in range(self.args.repeats):
            phase(f"timing {r + 1}/{self.args.repeats}")
            if pair is not None:
                t0 = time.perf_counter()
                for g in self.workload.groups:
                    pair(g)
                pair_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            images = torch.cat([one(g).cpu() for g in self.workload.groups])
            times.append(time.perf_counter() - t0)
            if progress is not None:
                progress.update(1)
        return times, pair_times, images

    def paired(self) -> Callable:
        """The baseline to time alternately with a row: the same plain compile as the baseline
        row, on the bench's own copy of the model, warmed up; its compilation is not counted
        against the row (:meth:`CompileCounter.excluded`)."""
        wl = self.workload
        with self.counter.excluded() as compiled:
            denoiser = self.pair_transformer if wl.compiler == "none" else torch.compile(
                self.pair_transformer, backend=_own_backend(wl.compiler), fullgraph=True, dynamic=False)

            def one(group) -> torch.Tensor:
                images = wl.run_group(denoiser, group)
                _sync(self.device)
                return images

            for group in self.warmup_groups:
                one(group)
        if wl.compiler != "none" and compiled["graphs"] < 1:  # an uncompiled pair would inflate the speed-up
            raise RuntimeError("the paired baseline did not compile a graph")
        return one

    def _run(self, method: Method, progress) -> dict:
        from .metrics import module_bytes, peak_memory_mb, quality

        wl, args = self.workload, self.args

        def phase(name: str) -> None:
            if progress is not None:
                progress.set_postfix_str(f"{method.label}: {name}", refresh=True)

        prepared, one, first = self._prepare(method, phase)
        if progress is not None:
            progress.update(1)
        is_baseline = self.reference is None
        pair = None
        if not is_baseline:
            phase("paired baseline (compile)")
            pair = self.paired()
        counts0 = prepared.counts()
        times, pair_times, images = self._time(one, phase, progress, pair)
        counts = prepared.counts() - counts0
        median = statistics.median(times)
        base_median = median if is_baseline else statistics.median(pair_times)
        recompiles, graphs = self.counter.recompiles(), self.counter.graphs()

        phase("memory")
        held = module_bytes(self.model) + prepared.held_bytes()
        peak = peak_memory_mb(lambda: one(wl.groups[0]), self.device, held)
        if progress is not None:
            progress.update(1)

        phase("quality")
        q = quality(images, self.reference, self.labels, self.real_features, self.classifier)
        if is_baseline:
            self.reference = images
        across = self._quality_across(prepared, phase, is_baseline)
        trajectories = args.repeats * len(wl.groups)
        warm_images = sum(g[0].numel() for g in self.warmup_groups)
        info = {k: v for k, v in prepared.info().items() if v is not None}
        config = prepared.config
        if info.get("probe_flops_share") is not None:  # a verified row states what its check costs
            config += f"; check: {info['probe_flops_share']:.3f} of a full step's FLOPs per forecast step"
        row = _empty_row(method, "ok", None, self.workload_info)
        row.update(
            config=config,
            speedup=base_median / median,
            time_s=median,
            times_s=times,
            baseline_time_s=base_median,
            baseline_times_s=pair_times or times,
            ms_per_image=1000.0 * median / args.seeds,
            psnr=_finite(q["psnr"]),
            ssim=q["ssim"],
            accuracy=q["accuracy"],
            fd=_finite(q["fd"]),
            peak_mem_mb=peak,
            compile_s=max(0.0, first - median * warm_images / args.seeds),
            recompiles=recompiles,
            graphs=graphs,
            steps=args.steps,
            full_steps=_per_trajectory(counts, "full", trajectories, args.steps, method.family),
            partial_steps=counts.partial / trajectories if counts.steps else None,
            identical_to_baseline=q["psnr"] is not None and math.isinf(q["psnr"]),
            across=across,
            info=info,
        )
        return row


def _per_trajectory(counts: StepCounts, field: str, trajectories: int, steps: int, family: str) -> float | None:
    if family == "baseline":
        return float(steps)
    if counts.steps == 0:
        return None
    return getattr(counts, field) / trajectories


# ----------------------------------------------------------------------------- output
def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    from tabulate import tabulate

    table = []
    for r in rows:
        if r["status"] != "ok":
            table.append([r["label"], f"{r['status'].upper()}: {r['reason']}"] + [""] * 9)
            continue
        if r["family"] == "baseline":
            psnr = "ref"
        elif r["identical_to_baseline"]:
            psnr = "inf"
        else:
            psnr = _fmt(r["psnr"], ".2f")
        full = "-" if r["full_steps"] is None else f"{r['full_steps']:.1f}"
        if r["partial_steps"]:
            full += f" +{r['partial_steps']:.1f}p"
        table.append([
            r["label"], r["config"], f"{r['speedup']:.2f}x", psnr,
            "ref" if r["family"] == "baseline" else _fmt(r["ssim"], ".4f"),
            _fmt(r["accuracy"], ".2f"), _fmt(r["fd"], ".2f"), f"{full}/{r['steps']}",
            _fmt(r["peak_mem_mb"], ".1f"), _fmt(r["compile_s"], ".1f"), r["recompiles"],
        ])
    headers = ["method", "config", "speed-up", "PSNR dB", "SSIM", "acc", "FD", "full steps",
               "peak MiB", "compile s", "recompiles"]
    return tabulate(table, headers=headers, maxcolwidths=[None, 48] + [None] * 9, disable_numparse=True)


def format_across(rows: list[dict]) -> str:
    """The rows' PSNR on the other requests (``--across-*``), one column per request; the
    run's own request first, for comparison."""
    from tabulate import tabulate

    names = next((list(r["across"]) for r in rows if r["status"] == "ok" and r.get("across")), [])
    if not names:
        return ""
    workload = rows[0]["workload"]
    own = f"CFG {workload['guidance']:g}, batch {workload['batch_size']} (timed)"
    table = []
    for r in rows:
        if r["status"] != "ok" or r["family"] == "baseline":
            continue
        own_psnr = "inf" if r["identical_to_baseline"] else _fmt(r["psnr"], ".2f")
        table.append([r["label"], own_psnr] + [_fmt(r["across"].get(n), ".2f", "inf") for n in names])
    return tabulate(table, headers=["method", own] + names, disable_numparse=True)


def write_json(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=2, allow_nan=False, default=str)
        f.write("\n")


def _missing_packages(plot: bool) -> list[str]:
    import importlib.util

    needed = {"skimage": "scikit-image", "tqdm": "tqdm"}
    if plot:
        needed["matplotlib"] = "matplotlib"
    return [pkg for mod, pkg in needed.items() if importlib.util.find_spec(mod) is None]


def run(args: argparse.Namespace) -> int:
    missing = _missing_packages(bool(args.plot))
    if missing:
        print(f"specdiff-fx bench: missing {', '.join(missing)}; install the bench extra: "
              "pip install 'specdiff-fx[bench]'", file=sys.stderr)
        return 2
    from tqdm import tqdm

    try:
        args = _resolve(args)
        methods = select_methods(all_methods(args), args.methods)
    except ValueError as exc:
        print(f"specdiff-fx bench: {exc}", file=sys.stderr)
        return 2
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        bench = Bench(args)
        info = bench.workload_info
        print(f"model: {info['model']}; {args.steps} steps, CFG {args.guidance:g} (batched), {args.seeds} seed(s), "
              f"{args.repeats} repeat(s), {args.threads} thread(s), device {info['device']}, "
              f"compiler {args.compiler}", flush=True)
        phases = 1 + args.repeats + 1
        rows = []
        with tqdm(total=len(methods) * phases, desc="bench", unit="run", file=sys.stderr,
                  disable=True if args.no_progress else None) as progress:
            for method in methods:
                done = progress.n
                rows.append(bench.run(method, progress))
                if args.json:  # a long run keeps what it measured so far
                    write_json(rows, args.json)
                progress.update(done + phases - progress.n)  # skipped rows complete their phases
                if rows[0]["status"] != "ok":
                    print(f"specdiff-fx bench: the baseline failed ({rows[0]['reason']}); stopping",
                          file=sys.stderr)
                    break
    except ValueError as exc:
        print(f"specdiff-fx bench: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(old_threads)
    print()
    print(format_table(rows))
    across = format_across(rows)
    if across:
        print(f"\nPSNR dB on other requests (same seeds, against the baseline on the same request; not timed):\n"
              f"{across}")
    notes = [r for r in rows if r["status"] != "ok"]
    if notes:
        print(f"\n{len(notes)} row(s) did not run; see their reason above.")
    if args.json:
        write_json(rows, args.json)
        print(f"\nrows written to {args.json}")
    if args.plot:
        from .plot import pareto_plot

        pareto_plot(rows, args.plot)
        print(f"Pareto plot written to {args.plot}")
    return 0 if rows and rows[0]["status"] == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdiff-fx bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
